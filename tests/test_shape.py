"""The architecture, checked: faces call only the pipeline, each shared step exists once, the core
install stays light."""

from __future__ import annotations

import ast
import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

SRC = Path(__file__).resolve().parents[1] / "src" / "lookalike"
FACES = ("cli", "app", "api", "eval", "report")  # report: the page of `eval --report`
# what a face may import from lookalike: the pipeline's public API, the errors, and the other faces
ALLOWED = {"lookalike", "lookalike.pipeline", "lookalike.errors"} | {f"lookalike.{f}" for f in FACES}


def _modules(face: str) -> list[Path]:
    path = SRC / face
    return sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            if node.module == "lookalike":  # `from lookalike import models` reaches a part
                found |= {f"lookalike.{a.name}" for a in node.names if (SRC / f"{a.name}.py").exists()}
    return {m for m in found if m == "lookalike" or m.startswith("lookalike.")}


def _face_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in FACES else None


def test_faces_import_nothing_below_the_pipeline():
    for face in FACES:
        for path in _modules(face):
            below = {m for m in _imports(path) if m not in ALLOWED and _face_of(m) != face}
            assert not below, f"{path.relative_to(SRC)} reaches past the pipeline: {sorted(below)}"


def test_the_pipeline_does_not_hand_out_its_parts_machinery():
    import lookalike.pipeline as pipeline

    exported = set(pipeline.__all__)
    assert not exported & {"Encoder", "run_parallel", "safely", "learn_whitening", "Storage", "Records", "LoadedModels"}
    assert all(hasattr(pipeline, name) for name in exported)


def _source() -> dict[Path, str]:
    return {p: p.read_text() for p in SRC.rglob("*.py")}


def test_shared_steps_exist_once():
    """read -> hash (images.read_photo), SQLite set-up (records.connect), the progress bar (cli.Bars) and
    the stage adapter (encoder.stage): each in one place, used everywhere else."""
    src = _source()

    def where(pattern: str) -> list[str]:
        return sorted(str(p.relative_to(SRC)) for p, text in src.items() if re.search(pattern, text))

    assert where(r"sqlite3\.connect\(") == ["records.py"]
    # the catalog's rows are written in one place (issue 24); the filters and the live index only read
    catalog_tables = r"(products|images|meta|projection|image_terms|image_log)\b"
    assert where(rf"(INSERT INTO|UPDATE|DELETE FROM|CREATE TABLE) {catalog_tables}") == ["records.py"]
    assert where(r"hashlib\.sha256\((data|self\.data|photo|[a-z_]+\.read)") == ["images.py"]
    assert where(r"from tqdm import|import tqdm") == ["cli.py"]
    assert where(r"lambda done, total: progress\(") == ["encoder.py"]


def test_the_core_install_is_light():
    """`pip install lookalike` (no extras) resolves to no torch, Streamlit, Playwright, pyarrow or
    schemathesis: walked over the installed distributions' own requirements."""
    project = tomllib.loads((SRC.parents[1] / "pyproject.toml").read_text())["project"]
    # onnx is core since issue 23: a catalog checks its models by fingerprint (what the graph computes,
    # read with onnx: 31 MB beside ONNX Runtime's 78), not by the bytes of the files
    heavy = {"torch", "streamlit", "playwright", "pyarrow", "schemathesis", "fastapi", "ray", "pymilvus", "tflite2onnx"}
    seen: set[str] = set()
    todo = [Requirement(r) for r in project["dependencies"]]
    while todo:
        req = todo.pop()
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name in seen or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        todo += [Requirement(r) for r in metadata.requires(name) or []]
    assert not seen & heavy, sorted(seen & heavy)
    assert {"onnxruntime", "numpy", "pillow", "faiss-cpu", "onnx"} <= seen
    for extra in ("app", "api", "tune", "dev", "parquet"):
        assert extra in project["optional-dependencies"], extra
    pinned = [r for r in project["dependencies"] if "==" in r]
    assert not pinned, f"core dependencies take compatible ranges (the lock file pins): {pinned}"


def test_no_module_imports_one_that_imports_it():
    """The import graph of src/lookalike has no cycle, imports inside functions and TYPE_CHECKING blocks
    included (issue 24: `cluster` and `indexing` imported each other). A package's `__init__` is left
    out: importing any submodule runs it, so it is no edge of the graph."""
    modules: dict[str, Path] = {}
    for path in SRC.rglob("*.py"):
        if path.name != "__init__.py":
            modules[".".join(path.relative_to(SRC.parent).with_suffix("").parts)] = path

    def imported(name: str, path: Path) -> set[str]:
        package = name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                found |= {module} | {f"{module}.{a.name}" for a in node.names}
        return {m for m in found if m in modules and m != name}

    graph = {name: imported(name, path) for name, path in modules.items()}

    def reaches(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += graph[m]
        return seen

    cycles = sorted(m for m in graph if m in reaches(m))
    assert not cycles, f"modules that import themselves through others: {cycles}"


def test_no_class_holds_several_rooms():
    """No class in src/lookalike is longer than 350 lines (issue 24: `CatalogDB` was 643, doing four
    jobs); the catalog's storage is one module per job, each saying its job on its first line."""
    long = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 350:
                long.append(f"{path.relative_to(SRC)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
    jobs = {"records": "records", "live_index": "live index", "filters": "filters", "storage": "storage"}
    for module, job in jobs.items():
        first = ast.get_docstring(ast.parse((SRC / f"{module}.py").read_text())).splitlines()[0]
        assert job in first.lower(), f"{module}.py: {first}"
    assert not (SRC / "catalog.py").exists()
