"""The layout's promises, checked from the source: no import cycle among the
project's modules, model/ never imports the service (nor FastAPI / Redis), the
API edge's image module stays free of torch, and no module grows past ~400
lines without saying why at its top."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "service")
MAX_LINES = 400


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = REPO, packages=PACKAGES) -> dict[str, set[str]]:
    """module -> project modules it imports (anywhere in the file, lazy imports too).
    `from pkg import name` counts as pkg.name where that is a module, else pkg."""
    files = {module_name(p, root): p for pkg in packages for p in (root / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        deps: set[str] = set()
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for a in node.names:
                    deps.add(f"{base}.{a.name}" if f"{base}.{a.name}" in files else base)
        graph[mod] = {d for d in deps if d in files and d != mod}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_the_old_data_prepare_cycle(tmp_path):
    """The finder on a copy of the flat layout's two modules that imported each other."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "__init__.py").write_text("")
    (tmp_path / "model" / "data.py").write_text(
        "def _check_manifest():\n    from model.prepare import MANIFEST_DIR\n")
    (tmp_path / "model" / "prepare.py").write_text("from model.data import default_cache_dir\n")
    assert find_cycle(import_graph(tmp_path, ("model",))) == ["model.data", "model.prepare", "model.data"]


def test_model_never_imports_the_service_nor_its_frameworks():
    for pkg in ("model",):
        for path in (REPO / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                for name in names:
                    assert name.split(".")[0] not in ("service", "fastapi", "redis", "starlette"), (path, name)


def test_the_api_edge_image_module_does_not_load_torch():
    """The Redis-mode API process (the app, its video coordinator and live sessions,
    and the video decoding and tracking they use) never loads torch."""
    code = ("import sys, service.images, model.images, service.server, service.videos, service.live, "
            "model.video.analyze, model.video.decode, model.video.track; "
            "service.server.create_app(service.settings.Settings(redis_url='redis://127.0.0.1:1/0')); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


def test_long_modules_say_why_at_their_top():
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            text = path.read_text()
            if text.count("\n") > MAX_LINES:
                doc = ast.get_docstring(ast.parse(text)) or ""
                assert "Long module:" in doc, f"{path.relative_to(REPO)}: {text.count(chr(10))} lines, no reason"


def imported_names(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.append(node.module or "")
    return names


def test_onnx_runtime_is_opened_only_inside_the_serving_package():
    """Which runtime runs what is the serving plan's decision (model/serving/plan.py);
    a module elsewhere opening graphs would be a second place deciding it."""
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            inside = path.is_relative_to(REPO / "model" / "serving")
            for name in imported_names(path):
                if name.split(".")[0] == "onnxruntime":
                    assert inside, f"{path.relative_to(REPO)} imports {name}"


def test_the_service_reaches_the_model_through_its_serving_package():
    """service/ uses model.serving (the engine), the torch-free image decoder, the
    video decoding and tracking (model.video) and the label names; never the
    networks, training or data code."""
    allowed = ("model.serving", "model.images", "model.labels", "model.video")
    for path in (REPO / "service").rglob("*.py"):
        for name in imported_names(path):
            if name.split(".")[0] == "model":
                assert name.startswith(allowed), f"{path.relative_to(REPO)} imports {name}"
