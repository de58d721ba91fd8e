"""Build `src/lookalike/backgrounds/`: the floor photos `lookalike tune` pastes catalog shoes onto.

    python tools/make_backgrounds.py [DATASETS]

From `clothing_small_shoes` (CC0: phone photos of shoes on floors and carpets), every photo made
upright and shrunk to 224 pixels on its short side (JPEG quality 70, no metadata): about 3 MB for the
297 photos. Tuning crops a random 40-100% square of one and scales it to the view size, as it did with
the full-size photos the benchmarks measured (BENCHMARKS.md, "Tuning on the catalog").
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
SIDE = 224


def main() -> None:
    datasets = Path(
        sys.argv[1] if len(sys.argv) > 1 else os.environ.get("LOOKALIKE_DATASETS", ROOT.parent / "shared" / "datasets")
    )
    source = datasets / "clothing_small_shoes"
    out = ROOT / "src" / "lookalike" / "backgrounds"
    out.mkdir(exist_ok=True)
    for old in out.glob("*.jpg"):
        old.unlink()
    photos = sorted(source.rglob("*.jpg"))
    for n, path in enumerate(photos):
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img).convert("RGB")
            scale = SIDE / min(img.size)
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)
            img.save(out / f"floor-{n:03d}.jpg", quality=70)
    (out / "LICENSE").write_text(
        "The photos in this folder are from the clothing_small_shoes dataset, released under CC0 1.0\n"
        "(public domain dedication): https://creativecommons.org/publicdomain/zero/1.0/\n"
        f"Made smaller by tools/make_backgrounds.py ({len(photos)} photos, {SIDE} px on the short side).\n"
    )
    size = sum(p.stat().st_size for p in out.glob("*.jpg"))
    print(f"{len(photos)} backgrounds, {size / 1e6:.1f} MB in {out}")


if __name__ == "__main__":
    main()
