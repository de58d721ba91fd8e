"""int8 models against float: speed per model, suites 1-4, and whether the detector finds the same shoes.

    python benchmarks/int8.py [--iou-images 1500]

The int8 models are made as `lookalike quantize` makes them, calibrated on a catalog of photos no
suite queries with: 64 `shoe_sandal_boot` catalog shots and 32 `clothing_small_shoes` phone photos.
Then: each model's time per image on one thread (float and int8, same inputs); suites 1-4 with the
float models, the int8 embedder, the int8 detector and both; the share of `sneakers50` photos whose
int8 detector crop box has IoU >= 0.9 with the float one. Writes benchmarks/out/int8.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from lookalike import Catalog
from lookalike.config import PipelineConfig
from lookalike.crop import choose_crop
from lookalike.encoder import Encoder
from lookalike.eval import evaluate
from lookalike.sources import Item

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from quality import DATASETS, SUITES  # noqa: E402
from speed import machine  # noqa: E402


def rows(dataset: str) -> list[dict]:
    with open(DATASETS / dataset / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def calibration_items() -> list[Item]:
    rng = random.Random(0)
    out = []
    for dataset, n in (("shoe_sandal_boot", 64), ("clothing_small_shoes", 32)):
        picked = rows(dataset)
        rng.shuffle(picked)
        out += [Item(f"{dataset}-{i}", str(DATASETS / dataset / r["file"])) for i, r in enumerate(picked[:n])]
    return out


def per_image_ms(encoder: Encoder, inputs: list, name: str) -> float:
    model = encoder.models.detector if name == "detector" else encoder.models.embedder
    for x in inputs[:5]:
        model.session.run(None, {model.input_name: x})
    t0 = time.perf_counter()
    for x in inputs:
        model.session.run(None, {model.input_name: x})
    return round((time.perf_counter() - t0) / len(inputs) * 1000, 2)


def iou(a, b) -> float:
    if a is None or b is None:
        return 1.0 if a is b else 0.0
    w = max(0.0, min(a.x2, b.x2) - max(a.x1, b.x1))
    h = max(0.0, min(a.y2, b.y2) - max(a.y1, b.y1))
    inter = w * h
    return inter / (a.area + b.area - inter) if inter else 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iou-images", type=int, default=1500)
    ap.add_argument("--suites", default="1,2,3,4", help="which suites (numbers)")
    args = ap.parse_args()
    out: dict = {"machine": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "calibration"
        with Catalog.open(directory, create=True) as cat:
            cat.index(calibration_items(), source_name="calibration")
            made = cat.quantize()
        out["models"] = {k: Path(v).name for k, v in made.items()}
        float_enc, int8_enc = Encoder(PipelineConfig()), Encoder(PipelineConfig(**made))

        # speed: the same inputs, one thread
        photos = [str(DATASETS / "mrstepup_multiview" / r["file"]) for r in rows("mrstepup_multiview")[:60]]
        images = [float_enc.load(p) for p in photos]
        det_inputs = [float_enc.models.detector.input_tensor(img) for img in images]
        emb_inputs = [float_enc.models.embedder.preprocess(float_enc.crop(img).image)[None] for img in images]
        out["ms_per_image"] = {
            name: {"float": per_image_ms(float_enc, xs, name), "int8": per_image_ms(int8_enc, xs, name)}
            for name, xs in (("detector", det_inputs), ("embedder", emb_inputs))
        }
        print(out["ms_per_image"])

        # the same shoes: the crop box of the float and the int8 detector
        sample = rows("sneakers50")
        random.Random(1).shuffle(sample)
        ious = []
        config = PipelineConfig().crop
        for r in sample[: args.iou_images]:
            img = float_enc.load(str(DATASETS / "sneakers50" / r["file"]))
            boxes = [choose_crop(img, enc.detect(img), config).box for enc in (float_enc, int8_enc)]
            ious.append(iou(*boxes))
        out["detector_crop_iou_ge_0.9"] = round(sum(v >= 0.9 for v in ious) / len(ious), 4)
        out["iou_images"] = len(ious)
        print("crop box IoU >= 0.9:", out["detector_crop_iou_ge_0.9"])

        variants = {"float": {}, "int8 embedder": {"embedder": made["embedder"]},
                    "int8 detector": {"detector": made["detector"]}, "int8 both": made}  # fmt: skip
        out["suites"] = {}
        for variant, options in variants.items():
            out["suites"][variant] = {}
            for name, dataset, label, query, gallery in SUITES:
                if name.split(".")[0] not in args.suites.split(","):
                    continue
                r = evaluate(DATASETS / dataset / "labels.csv", DATASETS / dataset, label, query, gallery, options)
                out["suites"][variant][name] = {k: round(r.metrics[k], 4) for k in ("recall@1", "recall@10", "mAP@10")}
                print(variant, name, out["suites"][variant][name], flush=True)

    print(f"\nMachine: {out['machine']}\n")
    print("| model | float ms | int8 ms | speed-up |\n|---|---|---|---|")
    for name, t in out["ms_per_image"].items():
        print(f"| {name} | {t['float']} | {t['int8']} | {t['float'] / t['int8']:.2f}x |")
    print(f"\ncrop box IoU >= 0.9 (float vs int8 detector), {out['iou_images']} sneakers50 photos: "
          f"{out['detector_crop_iou_ge_0.9']:.1%}\n")  # fmt: skip
    names = [s[0] for s in SUITES if s[0].split(".")[0] in args.suites.split(",")]
    print("| models | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    base = out["suites"]["float"]
    for variant, suites in out["suites"].items():
        cells = [
            f"{suites[n]['recall@1']:.3f} ({(suites[n]['recall@1'] - base[n]['recall@1']) * 100:+.1f})" for n in names
        ]
        print(f"| {variant} | " + " | ".join(cells) + " |")
    (ROOT / "benchmarks" / "out").mkdir(exist_ok=True)
    (ROOT / "benchmarks" / "out" / "int8.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
