"""The layout's import rules, read from the code's syntax tree (issue 20).

- the method (the modules directly in ``p3s_core/``) imports neither ComfyUI nor diffusers (nor
  transformers / accelerate) and none of ``p3s_core``'s engine or command-line subpackages;
- ``p3s_core/comfyui_engine`` imports ComfyUI and the method, never diffusers or the other subpackages;
- ``p3s_core/diffusers_engine`` imports diffusers / transformers and the method, never ComfyUI;
- ``p3s_core/cli`` (command line, train-many, evaluation) imports the method and the diffusers engine;
- ``nodes/`` imports ComfyUI, the method and the ComfyUI engine only;
- no import circle between the pack's modules (lazy imports inside functions count), and no module
  of ``p3s_core`` is over 550 lines.
Each rule is also run on a copy of the tree with a planted violation, which it must report.
"""
from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

COMFYUI = {"comfy", "comfy_extras", "comfy_api", "comfy_execution", "folder_paths", "server", "nodes",
           "execution", "node_helpers", "latent_preview", "app", "utils"}
DIFFUSERS = {"diffusers", "transformers", "accelerate"}
ENGINES = ("comfyui_engine", "diffusers_engine", "cli")


def _area(mod: str) -> str:
    """The layout area of a pack module name (``p3s_core.x``, ``p3s_core.comfyui_engine.y``, ``nodes.z``)."""
    parts = mod.split(".")
    if parts[0] == "nodes":
        return "nodes"
    if parts[0] == "p3s_core":
        return parts[1] if len(parts) > 1 and parts[1] in ENGINES else "method"
    return "other"


def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for top in ("p3s_core", "nodes"):
        for p in sorted((root / top).rglob("*.py")):
            rel = p.relative_to(root).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def _imports(mod: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """``(imported name, line)`` for every import in the file, relative ones resolved to pack names."""
    is_pkg = path.name == "__init__.py"
    package = mod if is_pkg else mod.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                # the pack is imported as ``<folder>.p3s_core`` by ComfyUI: ``..p3s_core`` from nodes/
                if target not in known and target.split(".")[0] not in ("p3s_core", "nodes"):
                    target = target.partition(".")[2]
            else:
                target = node.module or ""
            for a in node.names:  # ``from . import x`` names a module when x is one
                sub = f"{target}.{a.name}"
                found.append((sub if sub in known else target, node.lineno))
    return found


def violations(root: Path) -> list[str]:
    mods = _modules(root)
    known = set(mods)
    allowed = {
        "method": {"method"},
        "comfyui_engine": {"method", "comfyui_engine", "COMFYUI"},
        "diffusers_engine": {"method", "diffusers_engine", "DIFFUSERS"},
        "cli": {"method", "cli", "diffusers_engine", "DIFFUSERS"},
        "nodes": {"method", "comfyui_engine", "nodes", "COMFYUI"},
    }
    bad, graph = [], {m: set() for m in mods}
    for mod, path in mods.items():
        area = _area(mod)
        for name, line in _imports(mod, path, known):
            head = name.split(".")[0]
            if name in known or head in ("p3s_core",) or (head == "nodes" and name in known):
                kind = _area(name)
                target = name
                while target not in known and "." in target:
                    target = target.rpartition(".")[0]
                if target in known and target != mod:
                    graph[mod].add(target)
            elif head in COMFYUI:
                kind = "COMFYUI"
            elif head in DIFFUSERS:
                kind = "DIFFUSERS"
            else:
                continue
            if kind not in allowed[area]:
                bad.append(f"{path.relative_to(root)}:{line} ({area}) imports {name} ({kind})")
    bad += [f"import circle: {' -> '.join(c)}" for c in _cycles(graph)]
    return bad


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp) + [sorted(comp)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_pack_keeps_its_import_rules():
    assert violations(REPO) == []


def test_the_reader_sees_relative_and_lazy_imports():
    """Sanity of the reading: the parser sees the engines' imports of the method and of ComfyUI."""
    mods = _modules(REPO)
    imports = {name for name, _ in _imports("p3s_core.comfyui_engine.injector", mods["p3s_core.comfyui_engine.injector"],
                                            set(mods))}
    assert "p3s_core.injection" in imports and "p3s_core.comfyui_engine.checks" in imports
    lazy = {name for name, _ in _imports("p3s_core.comfyui_engine.checks", mods["p3s_core.comfyui_engine.checks"],
                                         set(mods))}
    assert "comfy.model_sampling" in lazy  # an import inside a function is read too


def long_modules(root: Path, limit: int = 550) -> dict[str, int]:
    return {str(p.relative_to(root)): n for p in (root / "p3s_core").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > limit}


def test_no_module_of_the_core_is_over_550_lines():
    assert long_modules(REPO) == {}


@pytest.fixture
def tree_copy(tmp_path):
    for top in ("p3s_core", "nodes"):
        shutil.copytree(REPO / top, tmp_path / top, ignore=shutil.ignore_patterns("__pycache__", "configs"))
    return tmp_path


def _plant(path: Path, code: str, inside_function: bool = False):
    text = path.read_text()
    if inside_function:
        code = "\n\ndef _planted():\n    " + code + "\n"
        path.write_text(text + code)
    else:
        path.write_text(text + "\n" + code + "\n")


@pytest.mark.parametrize("where, code, lazy, expect", [
    ("p3s_core/points.py", "import comfy.model_management", True, "points.py"),
    ("p3s_core/losses.py", "from diffusers import UNet2DConditionModel", False, "losses.py"),
    ("p3s_core/schedule.py", "from .comfyui_engine import injector", True, "schedule.py"),
    ("p3s_core/comfyui_engine/checks.py", "import diffusers", True, "checks.py"),
    ("p3s_core/comfyui_engine/injector.py", "from ..diffusers_engine import attention", True, "injector.py"),
    ("p3s_core/diffusers_engine/loading.py", "import folder_paths", True, "loading.py"),
    ("p3s_core/cli/common.py", "from ..comfyui_engine import checks", True, "common.py"),
    ("nodes/common.py", "from ..p3s_core import diffusers_engine", True, "common.py"),
    ("nodes/points_nodes.py", "from ..p3s_core.cli import main", True, "points_nodes.py"),
])
def test_a_planted_violation_is_reported(tree_copy, where, code, lazy, expect):
    assert violations(tree_copy) == []
    _plant(tree_copy / where, code, inside_function=lazy)
    found = violations(tree_copy)
    assert found and expect in found[0], found  # (a planted upward import may also close a circle)


def test_a_planted_circle_is_reported(tree_copy):
    _plant(tree_copy / "p3s_core/errors.py", "from .points import ImagePoints", inside_function=True)
    found = violations(tree_copy)
    assert any(f.startswith("import circle:") and "p3s_core.errors" in f and "p3s_core.points" in f for f in found)


def test_a_planted_long_module_is_reported(tree_copy):
    p = tree_copy / "p3s_core/points.py"
    n = len(p.read_text().splitlines())
    p.write_text(p.read_text() + "# planted\n" * (551 - n))
    assert long_modules(tree_copy) == {"p3s_core/points.py": 551}
