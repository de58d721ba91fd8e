"""Adapt the embedder to one catalog: `lookalike tune`.

The catalog's own product photos, with product ids as labels, teach the embedder which details tell
its products apart and which differences (background, crop, angle, light, blur, compression,
occlusion, a second shoe, a trouser leg) do not matter: each catalog crop is turned into several
shopper-like views, and a sub-center CosFace loss (normalised class proxies, a few per product, an
additive cosine margin) pulls a product's views towards its nearest proxy and away from the other
products. A product with one photo still works: its views are its positives.

To fit in minutes on a CPU, the stem and early blocks of EfficientNet-Lite0 stay frozen: they run
once per view in ONNX Runtime (about 10x faster than torch for that part here) and their small output
map is kept in memory; only the last blocks, the head convolution and a projection are trained, in
torch, on that cache. The result is one ONNX file (frozen trunk + tuned tail, plus the untuned tail
beside it) whose output is [tuned vector, untuned vector] weighted by `original_weight`: keeping what
the ImageNet features know is what keeps products added after tuning from getting worse.

torch is needed here only (`pip install 'lookalike[tune]'`); the tuned model is served by ONNX Runtime.
"""

from __future__ import annotations

import copy
import io
import math
import os
import random
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from lookalike.errors import LookalikeError

Progress = Callable[[str, int, int | None], None]  # (stage, done, total)
BUILTIN = "builtin"
MEAN, STD = 127.0, 128.0  # EfficientNet-Lite0's preprocessing (as in the shipped ONNX metadata)


@dataclass(frozen=True)
class TuneOptions:
    # Defaults measured on sneakers50 (benchmarks/tune_lab.py, BENCHMARKS.md): each change from the
    # first recipe (blocks 11+, 3 epochs at 288 px, one proxy, no pairs or legs) raised suite 1's R@1
    views: int = 8  # shopper-like views per catalog photo (the first is the clean crop)
    epochs: int = 2  # 2 epochs from block 9 beat 3 from block 11 in less time: depth matters more than epochs
    tail_from: int = 9  # blocks from this one on (and the head) are trained; 16 = head only
    dim: int = 512  # size of the tuned part of the vector
    margin: float = 0.35  # CosFace margin
    # proxies per product (sub-center CosFace): a product's side, top and sole views each keep a centre of
    # their own instead of being pulled into one
    subcenters: int = 3
    scale: float = 30.0  # CosFace scale
    lr: float = 1e-3  # head and proxies
    # the trained blocks learn at lr * blocks_lr; 0.3 against 0.1: suite 1 R@1 +4.7, suite 5 -0.4 (BENCHMARKS.md)
    blocks_lr: float = 0.3
    batch: int = 128
    # share of the untuned vector in the output; 0 = tuned only. It is what keeps products that tuning
    # never saw (suite 5) from getting worse (BENCHMARKS.md)
    original_weight: float = 0.75
    size: int = 288  # input size, as the catalog's embedder runs
    # size of the training views (at most `size`; 0 = `size`): the network is size-free, and 224-px views
    # train in half the time of 288-px ones, with a better suite-1 R@1
    train_size: int = 224
    seed: int = 0
    # photos to paste catalog shoes onto: "builtin" (floor photos shipped with lookalike, CC0: with them suite 1
    # reaches 0.70 R@1 where synthetic backgrounds alone give 0.686), a folder of one's own, or "none" (synthetic)
    backgrounds: str | None = BUILTIN
    pairs: float = 0.3  # share of views showing a pair (a second, shifted copy), as worn photos crop both shoes
    legs: float = 0.3  # share of views with a trouser leg over the top of the shoe, as worn photos have
    # noisy feedback (a shopper clicks a lookalike): after the first epoch, a feedback photo whose product's
    # proxies do not claim it (wrong labels are learned last) weighs this much from then on; 1 = no guard
    feedback_trust: float = 1.0
    feedback_cap: int = 100  # one product's feedback photos weigh together at most as much as this many

    def __post_init__(self) -> None:
        checks = [
            ("views", 1 <= self.views <= 64), ("epochs", 1 <= self.epochs <= 100),
            ("tail_from", 0 <= self.tail_from <= 16), ("dim", 16 <= self.dim <= 2048),
            ("margin", 0 <= self.margin < 1), ("subcenters", 1 <= self.subcenters <= 8),
            ("scale", 1 <= self.scale <= 128), ("lr", 0 < self.lr < 1),
            ("blocks_lr", 0 <= self.blocks_lr <= 10), ("pairs", 0 <= self.pairs <= 1), ("legs", 0 <= self.legs <= 1),
            ("batch", 8 <= self.batch <= 4096), ("original_weight", 0 <= self.original_weight < 1),
            ("feedback_trust", 0 <= self.feedback_trust <= 1), ("feedback_cap", 1 <= self.feedback_cap <= 100_000),
            ("size", self.size % 32 == 0 and 96 <= self.size <= 640),
            ("train_size", self.train_size == 0 or (self.train_size % 32 == 0 and 96 <= self.train_size <= 640)),
        ]  # fmt: skip
        for name, ok in checks:
            if not ok:
                raise LookalikeError(f"tune option {name}={getattr(self, name)!r} is out of range")

    @property
    def view_size(self) -> int:
        """The training views' size: `train_size`, never above the size the embedder runs at."""
        return min(self.train_size, self.size) if self.train_size else self.size


def options_from_text(options: dict[str, str], **defaults: object) -> TuneOptions:
    """TuneOptions from `key=value` text (command line, API), over `defaults`; unknown keys refused."""
    from dataclasses import fields

    kinds = {f.name: str(f.type) for f in fields(TuneOptions)}
    unknown = sorted(set(options) - set(kinds))
    if unknown:
        raise LookalikeError(f"unknown tune option(s) {', '.join(unknown)} (known: {', '.join(kinds)})")
    parsed: dict[str, object] = dict(defaults)
    for key, text in options.items():
        try:
            parsed[key] = int(text) if "int" in kinds[key] else float(text) if "float" in kinds[key] else text or None
        except ValueError:
            raise LookalikeError(f"tune option {key}={text!r}: expected a number") from None
    return TuneOptions(**parsed)


# -- shopper-like views ----------------------------------------------------------------------------
def _backgrounds(folder: str | None) -> list[Path]:
    if not folder or folder == "none":
        return []
    if folder == BUILTIN:
        folder = str(Path(__file__).with_name("backgrounds"))
    suffixes = {".jpg", ".jpeg", ".png", ".webp"}
    found = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in suffixes)
    if not found:
        raise LookalikeError(f"{folder}: no background photos (.jpg, .png, .webp) found")
    return found


def _background(size: int, rng: random.Random, photos: list[Path]) -> Image.Image:
    """A floor, street or table to put the shoe on: a random part of a given photo, else synthetic
    (a colour gradient with texture noise), since catalog shots on white never show one."""
    if photos and rng.random() < 0.8:
        with Image.open(rng.choice(photos)) as photo:
            photo = photo.convert("RGB")
            side = int(min(photo.size) * rng.uniform(0.4, 1.0))
            x, y = rng.randint(0, photo.width - side), rng.randint(0, photo.height - side)
            return photo.crop((x, y, x + side, y + side)).resize((size, size), Image.BILINEAR)
    a = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
    b = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
    t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    grad = a + (b - a) * (t if rng.random() < 0.5 else t.transpose(1, 0, 2))
    noise = np.random.default_rng(rng.randint(0, 2**31)).normal(0, rng.uniform(2, 25), (size, size, 1))
    return Image.fromarray(np.clip(np.broadcast_to(grad, (size, size, 3)) + noise, 0, 255).astype(np.uint8))


def _shoe_mask(img: Image.Image) -> Image.Image:
    """Where the shoe is in a catalog shot on white: everything but the white connected to the border
    (so a white shoe's own white parts stay), with a soft edge and no white halo around it."""
    small = np.asarray(img.convert("L").resize((96, 96), Image.BILINEAR)) >= 235
    outside = np.zeros_like(small)
    for edge in (np.s_[0, :], np.s_[-1, :], np.s_[:, 0], np.s_[:, -1]):
        outside[edge] = small[edge]
    while True:  # grow the border's white through white pixels (a flood fill, vectorised)
        grown = outside.copy()
        grown[1:] |= outside[:-1]
        grown[:-1] |= outside[1:]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= small
        if np.array_equal(grown, outside):
            break
        outside = grown
    mask = Image.fromarray(((~outside) * 255).astype(np.uint8)).resize(img.size, Image.BILINEAR)
    return mask.point(lambda v: 255 if v > 170 else 0).filter(ImageFilter.GaussianBlur(1.0))


def _pair(img: Image.Image, rng: random.Random) -> Image.Image:
    """The shoe with a second copy beside it (mirrored or not, a little smaller, either in front), cropped
    to both and padded square with white: the union crop the detector makes of a worn or standing pair."""
    size = img.width
    other = ImageOps.mirror(img) if rng.random() < 0.5 else img
    other = other.resize((int(size * rng.uniform(0.8, 1.0)),) * 2, Image.BILINEAR)
    dx = int(size * rng.uniform(0.15, 0.6)) * rng.choice((-1, 1))
    dy = int(size * rng.uniform(-0.3, 0.3))
    canvas = Image.new("RGB", (3 * size, 3 * size), (255, 255, 255))
    first, second = ((img, (size, size)), (other, (size + dx, size + dy)))
    if rng.random() < 0.5:
        first, second = second, first
    for part, at in (first, second):
        canvas.paste(part, at, _shoe_mask(part))
    box = Image.fromarray((np.asarray(canvas.convert("L")) < 235).astype(np.uint8)).getbbox()
    if box is None:
        return img
    x1, y1, x2, y2 = box
    side = max(x2 - x1, y2 - y1)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(canvas.crop(box), ((side - (x2 - x1)) // 2, (side - (y2 - y1)) // 2))
    return square.resize((size, size), Image.BILINEAR)


def _leg(img: Image.Image, rng: random.Random) -> Image.Image:
    """A trouser leg or sock coming down over the top of the shoe, slanted, in a cloth-like colour."""
    size = img.width
    draw = ImageDraw.Draw(img)
    width = size * rng.uniform(0.25, 0.6)
    centre = size * rng.uniform(0.3, 0.7)
    bottom = size * rng.uniform(0.15, 0.5)
    slant = size * rng.uniform(-0.15, 0.15)
    dark = rng.random() < 0.6  # mostly dark or denim cloth, else any colour
    colour = (rng.randint(0, 90), rng.randint(0, 90), rng.randint(0, 140)) if dark else \
        tuple(rng.randint(0, 255) for _ in range(3))  # fmt: skip
    draw.polygon([(centre - width / 2 + slant, -1), (centre + width / 2 + slant, -1),
                  (centre + width / 2, bottom + rng.uniform(-0.05, 0.05) * size), (centre - width / 2, bottom)],
                 fill=colour)  # fmt: skip
    return img


def augment(crop: Image.Image, rng: random.Random, size: int, photos: list[Path] = (), pairs: float = 0.0,
            legs: float = 0.0, shopper: bool = False) -> Image.Image:  # fmt: skip
    """One shopper-like view of a catalog crop (a shoe on white, padded square). A shopper's own photo
    (`shopper`) already has its background, its second shoe and its trouser leg: it only gets the
    camera's changes (angle, framing, light, blur, compression)."""
    img = crop.convert("RGB").resize((size, size), Image.BILINEAR)
    if not shopper and rng.random() < pairs:
        img = _pair(img, rng)
    if not shopper and rng.random() < 0.7:  # cut the shoe out of its white background and put it elsewhere
        img = Image.composite(img, _background(size, rng, list(photos)), _shoe_mask(img))
    if not shopper and rng.random() < legs:
        img = _leg(img, rng)
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    if rng.random() < 0.5:  # a camera that is not square to the shoe
        d = size * rng.uniform(0.05, 0.2)
        near, far = (lambda: rng.uniform(0, d)), (lambda: size - rng.uniform(0, d))
        quad = [near(), near(), near(), far(), far(), far(), far(), near()]  # corners, clockwise from top-left
        img = img.transform((size, size), Image.QUAD, quad, Image.BILINEAR, fillcolor=(255, 255, 255))
    if rng.random() < 0.5:
        img = img.rotate(rng.uniform(-20, 20), Image.BILINEAR, fillcolor=tuple(rng.randint(0, 255) for _ in range(3)))
    scale, ratio = rng.uniform(0.45, 1.0), math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w = min(size, int(size * math.sqrt(scale * ratio)))
    h = min(size, int(size * math.sqrt(scale / ratio)))
    x, y = rng.randint(0, size - w), rng.randint(0, size - h)
    img = img.crop((x, y, x + w, y + h)).resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32)
    arr = (arr - arr.mean()) * rng.uniform(0.6, 1.4) + arr.mean() * rng.uniform(0.6, 1.3)  # contrast, light
    grey = arr.mean(axis=2, keepdims=True)
    arr = grey + (arr - grey) * rng.uniform(0.5, 1.5)  # saturation
    arr = arr * np.array([rng.uniform(0.85, 1.15) for _ in range(3)], dtype=np.float32)  # white balance
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if rng.random() < 0.3:  # something in front of the shoe
        ow, oh = int(size * rng.uniform(0.1, 0.4)), int(size * rng.uniform(0.1, 0.4))
        ox, oy = rng.randint(0, size - ow), rng.randint(0, size - oh)
        img.paste(tuple(rng.randint(0, 255) for _ in range(3)), (ox, oy, ox + ow, oy + oh))
    if rng.random() < 0.4:  # a small phone photo, scaled up
        small = int(size * rng.uniform(0.3, 0.7))
        img = img.resize((small, small), Image.BILINEAR).resize((size, size), Image.BILINEAR)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 2.0)))
    if rng.random() < 0.5:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=rng.randint(25, 90))
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return img


def _tensor(img: Image.Image, size: int) -> np.ndarray:
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return ((np.asarray(img, dtype=np.float32) - MEAN) / STD).transpose(2, 0, 1)


# -- the network ---------------------------------------------------------------------------------
def _torch():
    try:
        import torch
    except ImportError:
        raise LookalikeError("tuning needs torch: pip install 'lookalike[tune]'") from None
    return torch


def _modules(tail_from: int):
    """(trunk, original tail, tuned tail) as torch modules over EfficientNet-Lite0's ImageNet weights."""
    torch = _torch()
    from lookalike.models import load_lite0_torch

    net = load_lite0_torch()
    nn = torch.nn

    class Trunk(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.bn0, self.act = net._conv_stem, net._bn0, net._swish
            self.blocks = nn.ModuleList(net._blocks[:tail_from])

        def forward(self, x):
            x = self.act(self.bn0(self.stem(x)))
            for block in self.blocks:
                x = block(x)
            return x

    class Tail(nn.Module):
        """The last blocks and the head convolution, then GeM (p=3) to 1280-d."""

        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(net._blocks[tail_from:])
            self.head, self.bn1, self.act = net._conv_head, net._bn1, net._swish

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            x = self.act(self.bn1(self.head(x)))
            return x.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)

    original = Tail().eval()
    return Trunk().eval(), original, copy.deepcopy(original)


def _export(module, example, path: Path, output: str, dynamic_size: bool) -> None:
    torch = _torch()
    import warnings

    axes = {"image": {0: "batch", 2: "height", 3: "width"} if dynamic_size else {0: "batch"}, output: {0: "batch"}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter (constant folding, shape inference)
        torch.onnx.export(module, (example,), str(path), input_names=["image"], output_names=[output],
                          dynamic_axes=axes, opset_version=17, dynamo=False)  # fmt: skip


# -- views through the frozen trunk --------------------------------------------------------------
def trunk_views(crops: list[Image.Image], options: TuneOptions, trunk_path: Path, progress: Progress | None = None,
                threads: int = 2, shopper: list[bool] | None = None) -> np.ndarray:  # fmt: skip
    """[len(crops) * views, C, H, W] float16: the frozen trunk's output for every view of every crop
    (`shopper[i]`: crop i is a shopper's photo, see `augment`)."""
    from lookalike.onnx import session

    photos = _backgrounds(options.backgrounds)
    size = options.view_size
    sess = session(trunk_path, 1)
    out: np.ndarray | None = None
    done = 0

    def one(i: int) -> tuple[int, np.ndarray]:
        rng = random.Random(options.seed * 1_000_003 + i)
        views = [crops[i].convert("RGB")] + [
            augment(crops[i], rng, size, photos, options.pairs, options.legs, bool(shopper and shopper[i]))
            for _ in range(options.views - 1)
        ]
        batch = np.stack([_tensor(v, size) for v in views]).astype(np.float32)
        return i, sess.run(None, {"image": batch})[0].astype(np.float16)

    with ThreadPoolExecutor(threads) as pool:
        for i, maps in pool.map(one, range(len(crops))):
            if out is None:
                out = np.empty((len(crops) * options.views, *maps.shape[1:]), dtype=np.float16)
            out[i * options.views : (i + 1) * options.views] = maps
            done += 1
            if progress and (done % 16 == 0 or done == len(crops)):
                progress("views", done, len(crops))
    return out


# -- training --------------------------------------------------------------------------------------
@dataclass
class TuneReport:
    products: int
    images: int
    views: int
    seconds_views: float
    seconds_training: float
    final_loss: float
    train_accuracy: float
    options: dict
    feedback_photos: int = 0  # of `images`: shoppers' photos (feedback), the rest catalog shots


def _keep_freed_memory() -> None:
    """Each training step allocates and frees buffers of tens of MB; glibc hands those back to the kernel
    and page-faults them in again on the next step. Measured here: 3.5 s -> 1.3 s per step of 128
    views, system time 42 s -> 2 s. Keep them in the process instead (Linux/glibc only)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def train(maps: np.ndarray, labels: np.ndarray, tail, options: TuneOptions, progress: Progress | None = None,
          should_stop: Callable[[], bool] = lambda: False, shopper: np.ndarray | None = None):  # fmt: skip
    """Train `tail` + a projection with CosFace on cached trunk maps; returns (projection, loss, accuracy).
    `shopper`: which maps are views of feedback photos (weighed by `feedback_cap` and `feedback_trust`)."""
    torch = _torch()
    nn = torch.nn
    torch.manual_seed(options.seed)
    _keep_freed_memory()
    classes = int(labels.max()) + 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the training step; views stay ONNX
    projection = nn.Linear(1280, options.dim).to(device)
    proxies = nn.Parameter((torch.randn(classes * options.subcenters, options.dim) * 0.01).to(device))
    tail.to(device).train()
    # channels-last runs oneDNN's faster convolution kernels on CPU: 2.0 s instead of 3.1 s per step here
    tail.to(memory_format=torch.channels_last)
    for m in tail.modules():  # batch-norm statistics stay ImageNet's: small, one-catalog batches
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    optimizer = torch.optim.AdamW(
        [{"params": tail.parameters(), "lr": options.lr * options.blocks_lr},
         {"params": list(projection.parameters()) + [proxies], "lr": options.lr}],
        weight_decay=1e-4,
    )  # fmt: skip
    steps = options.epochs * math.ceil(len(maps) / options.batch)
    warmup = max(1, steps // 10)  # then cosine down to zero
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: min(1.0, (k + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps))
    )
    rng = np.random.default_rng(options.seed)
    weights = _feedback_weights(labels, shopper, options.feedback_cap, options.views)
    step, loss_value, correct, seen = 0, float("nan"), 0, 0
    for epoch in range(options.epochs):
        if epoch == 1 and shopper is not None and shopper.any() and options.feedback_trust < 1:
            weights = weights * _trust(maps, labels, shopper, tail, projection, proxies, options, device)
        order = rng.permutation(len(maps))
        correct = seen = 0
        for start in range(0, len(order), options.batch):
            if should_stop():
                raise KeyboardInterrupt
            idx = np.sort(order[start : start + options.batch])
            x = torch.from_numpy(maps[idx].astype(np.float32)).to(device).contiguous(memory_format=torch.channels_last)
            y = torch.from_numpy(labels[idx]).to(device)
            z = nn.functional.normalize(projection(tail(x)), dim=1)
            cos = z @ nn.functional.normalize(proxies, dim=1).T  # [batch, classes * subcenters]
            cos = cos.view(len(idx), classes, options.subcenters).amax(dim=2)  # a product: its nearest centre
            logits = options.scale * (cos - options.margin * nn.functional.one_hot(y, classes))
            w = torch.from_numpy(weights[idx]).to(device)
            loss = (nn.functional.cross_entropy(logits, y, reduction="none") * w).sum() / w.sum().clamp_min(1e-6)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            loss_value = float(loss.detach())
            correct += int((cos.argmax(1) == y).sum())
            seen += len(idx)
            if progress:
                progress("training", step, steps)
    tail.eval().to("cpu", memory_format=torch.contiguous_format)  # exported on the CPU
    return projection.to("cpu"), loss_value, correct / max(seen, 1)


def _feedback_weights(labels: np.ndarray, shopper: np.ndarray | None, cap: int, views: int) -> np.ndarray:
    """1 for catalog views; a product's feedback photos weigh together at most as much as `cap` photos
    (each photo has `views` views), so one product's flood of clicks cannot take the training over."""
    weights = np.ones(len(labels), dtype=np.float32)
    if shopper is None or not shopper.any():
        return weights
    photos = np.bincount(labels[shopper], minlength=int(labels.max()) + 1) / views
    share = np.minimum(1.0, cap / np.maximum(photos, 1))
    weights[shopper] = share[labels[shopper]]
    return weights


def _trust(maps, labels, shopper, tail, projection, proxies, options: TuneOptions, device) -> np.ndarray:
    """After the first epoch: feedback views whose product's proxies claim their photo's clean view
    keep their weight, the others weigh `feedback_trust` (mislabelled photos are the last learned)."""
    torch = _torch()
    nn = torch.nn
    classes = int(labels.max()) + 1
    out = np.ones(len(labels), dtype=np.float32)
    first = np.nonzero(shopper)[0][:: options.views]  # each feedback photo's clean view
    tail.eval()
    with torch.no_grad():
        for start in range(0, len(first), options.batch):
            idx = first[start : start + options.batch]
            x = torch.from_numpy(maps[idx].astype(np.float32)).to(device).contiguous(memory_format=torch.channels_last)
            z = nn.functional.normalize(projection(tail(x)), dim=1)
            cos = (z @ nn.functional.normalize(proxies, dim=1).T).view(len(idx), classes, options.subcenters).amax(2)
            claimed = cos.argmax(1).cpu().numpy() == labels[idx]
            for i, ok in zip(idx, claimed, strict=True):
                if not ok:
                    out[i : i + options.views] = options.feedback_trust
    tail.train()
    for m in tail.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return out


def export_tuned(trunk, original, tuned, projection, options: TuneOptions, path: Path) -> None:
    """One ONNX embedder: image -> [w_t * tuned, w_o * original], each part unit length (the embedder
    normalises the whole). Runs at any size that is a multiple of 32, like the shipped one."""
    torch = _torch()
    nn = torch.nn
    w_o = math.sqrt(options.original_weight)
    w_t = math.sqrt(1 - options.original_weight)

    class Tuned(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk, self.original, self.tuned, self.projection = trunk, original, tuned, projection

        def forward(self, x):
            h = self.trunk(x)
            t = nn.functional.normalize(self.projection(self.tuned(h)), dim=1)
            if w_o == 0:
                return t
            o = nn.functional.normalize(self.original(h), dim=1)
            return torch.cat([w_t * t, w_o * o], dim=1)

    model = Tuned().eval()
    tmp = path.with_suffix(".tmp")
    _export(model, torch.zeros(1, 3, options.size, options.size), tmp, "vector", dynamic_size=True)
    import onnx

    proto = onnx.load(str(tmp))
    props = {p.key: p.value for p in proto.metadata_props}
    props.update({
        "lookalike.kind": "embedder", "lookalike.input_size": str(options.size),
        "lookalike.mean": "127,127,127", "lookalike.std": "128,128,128",
        "lookalike.tuned": str(asdict(options)), "license": "Apache-2.0 (EfficientNet-Lite0 ImageNet weights, tuned)",
    })  # fmt: skip
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(tmp))
    os.replace(tmp, path)


def tune_model(crops: list[Image.Image], labels: list[str], out: Path, options: TuneOptions | None = None,
               progress: Progress | None = None, threads: int = 2,
               shopper: list[bool] | None = None) -> TuneReport:  # fmt: skip
    """Tune on labelled crops and write the tuned ONNX embedder to `out` (atomically); `shopper[i]`:
    crop i is a shopper's photo of its product (feedback), the rest catalog shots."""
    options = options or TuneOptions()
    torch = _torch()
    torch.set_num_threads(threads)
    names = sorted(set(labels))
    if len(names) < 2:
        raise LookalikeError(f"tuning needs at least 2 products with photos (found {len(names)})")
    y = np.repeat(np.asarray([names.index(p) for p in labels], dtype=np.int64), options.views)
    trunk, original, tuned = _modules(options.tail_from)
    with tempfile.TemporaryDirectory() as tmp:
        trunk_path = Path(tmp) / "trunk.onnx"
        size = options.view_size
        _export(trunk, torch.zeros(1, 3, size, size), trunk_path, "maps", dynamic_size=False)
        t0 = time.perf_counter()
        maps = trunk_views(crops, options, trunk_path, progress, threads, shopper)
    t1 = time.perf_counter()
    views_of_shoppers = np.repeat(np.asarray(shopper or [False] * len(crops), dtype=bool), options.views)
    projection, loss, accuracy = train(maps, y, tuned, options, progress, shopper=views_of_shoppers)
    t2 = time.perf_counter()
    export_tuned(trunk, original, tuned, projection, options, out)
    return TuneReport(
        len(names), len(crops), len(maps), t1 - t0, t2 - t1, loss, accuracy, asdict(options), sum(shopper or ())
    )
