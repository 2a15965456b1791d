"""The Comfy Registry archive (issue 25): what it holds, and zero hits of what the registry flags.

The files are selected as comfy-cli's ``comfy node pack`` selects them (``git ls-files`` minus
``.comfyignore``; scripts/registry_package.py says how). Checked by hand once against comfy-cli 1.23.0
(``comfy node pack`` in a clone of this branch, at its last commit): the same 58 files, none more or less.
"""
from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest

import registry_package as rp

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def files():
    return rp.archive_files(REPO)


def test_archive_holds_what_runs_in_comfyui(files):
    shipped = set(files)
    must = {"__init__.py", "requirements.txt", "pyproject.toml", "README.md", "CHANGELOG.md",
            "locales/en/nodeDefs.json"}
    must |= {p.relative_to(REPO).as_posix() for p in (REPO / "nodes").glob("*.py")}
    # the method and its ComfyUI engine (the layout: tests/unit/test_layout.py)
    must |= {p.relative_to(REPO).as_posix() for p in (REPO / "p3s_core").glob("*.py")}
    must |= {p.relative_to(REPO).as_posix() for p in (REPO / "p3s_core" / "comfyui_engine").glob("*.py")}
    must |= {p.relative_to(REPO).as_posix() for p in (REPO / "web" / "js").rglob("*") if p.is_file()}
    must |= {p.relative_to(REPO).as_posix() for p in (REPO / "workflows").rglob("*") if p.is_file()}
    assert must <= shipped, sorted(must - shipped)
    assert any(f.startswith("p3s_core/") for f in shipped)


@pytest.mark.parametrize("prefix", ["tests/", "scripts/", "benchmarks/", ".ci/", ".github/", "p3s/",
                                    "p3s_core/cli/", "p3s_core/diffusers_engine/", "p3s_core/configs/",
                                    "requirements-dev.txt", ".comfyignore"])
def test_archive_leaves_out_development_and_the_command_line(files, prefix):
    assert [f for f in files if f.startswith(prefix)] == []


def test_scan_of_the_archive_has_zero_hits(files):
    hits = rp.scan(REPO, files)
    assert hits == [], "\n".join(map(str, hits))
    # the scan did look at code: every shipped .py parses and is counted
    assert sum(f.endswith(".py") for f in files) >= 20 and sum(f.endswith(".js") for f in files) >= 1


def unresolved_imports(files: list[str]) -> list[str]:
    """Imports of the pack's own modules (relative, or absolute ``p3s_core``; lazy ones inside
    functions included) that name no file of ``files``."""
    import ast

    shipped = set(files)

    def exists(parts):
        return "/".join(parts) + ".py" in shipped or "/".join(parts + ["__init__.py"]) in shipped

    missing = []
    for f in (f for f in files if f.endswith(".py")):
        pkg = list(Path(f).parent.parts)
        for node in ast.walk(ast.parse((REPO / f).read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level == 0 and not (node.module or "").startswith("p3s_core"):
                continue
            base = pkg[:len(pkg) - node.level + 1] if node.level else []
            mod = base + (node.module.split(".") if node.module else [])
            if node.module and not exists(mod):
                missing.append(f"{f}:{node.lineno}: {'.'.join(mod)}")
            elif not node.module:  # from . import x: x is a module of the package or a name in its __init__
                missing += [f"{f}:{node.lineno}: {a.name}" for a in node.names
                            if not exists(mod + [a.name]) and not exists(mod)]
    return missing


def test_shipped_python_imports_only_shipped_modules(files):
    """The archive is self-contained: the nodes never import the command line or diffusers code."""
    assert unresolved_imports(files) == []


def test_import_check_finds_a_module_left_out(files):
    missing = unresolved_imports([f for f in files if f != "p3s_core/train.py"])
    assert any(m.startswith("nodes/trainer_nodes.py:") and m.endswith("p3s_core.train") for m in missing), missing


def test_ignore_file_reads_the_same_for_git_and_comfy_cli():
    raw = (REPO / ".comfyignore").read_text(encoding="utf-8").splitlines()
    # comfy-cli strips each line, git keeps leading spaces: none, so both read the same patterns
    assert all(line == line.lstrip() for line in raw)
    assert "/tests/" in rp.ignore_patterns(REPO) and "/scripts/" in rp.ignore_patterns(REPO)


# ----------------------------------------------------------------------------- the scan can fail

PLANTED_PY = {
    "import subprocess": "import subprocess\n",
    "from subprocess import run": "from subprocess import run\n",
    "os.system": "import os\nos.system('ls')\n",
    "os alias popen": "import os as o\no.popen('ls')\n",
    "from os import system": "from os import system\n",
    "eval": "x = eval('1+1')\n",
    "exec": "exec('x = 1')\n",
    "builtins.exec": "import builtins\nbuiltins.exec('x = 1')\n",
    "__import__": "m = __import__('json')\n",
    "socket": "import socket\n",
    "urllib.request": "import urllib.request\n",
    "requests (lazy)": "def f():\n    import requests\n    return requests\n",
    "http.client": "from http.client import HTTPConnection\n",
    "aiohttp": "import aiohttp\n",
    "pip string": "CMD = ['python', '-m', 'pip', 'install', 'x']\n",
    "pip install text": "CMD = 'pip install scikit-image'\n",
    "import pip": "import pip\n",
}


@pytest.mark.parametrize("name", sorted(PLANTED_PY))
def test_scan_finds_a_planted_python_violation(tmp_path, name):
    f = tmp_path / "planted.py"
    f.write_text(PLANTED_PY[name])
    hits = rp.scan_file(f, "planted.py")
    assert hits and all(h.path == "planted.py" for h in hits), name


@pytest.mark.parametrize("code", ["eval('1')", "const f = new Function('return 1')",
                                  "const x = new XMLHttpRequest()", "new WebSocket('ws://x')",
                                  "fetch('https://example.com/x')"])
def test_scan_finds_a_planted_javascript_violation(tmp_path, code):
    f = tmp_path / "planted.js"
    f.write_text(f"export function g() {{\n  {code};\n}}\n")
    assert [h.line for h in rp.scan_file(f, "planted.js")] == [2]


def test_scan_has_no_false_alarm_on_method_calls(tmp_path):
    f = tmp_path / "fine.py"
    f.write_text("model.eval()\nadapter.eval().requires_grad_(False)\nre.compile('x')\n"
                 "pipeline = 'the RNGR pipeline'\nimport os\nos.path.join('a', 'b')\n")
    g = tmp_path / "fine.js"
    g.write_text("api.fetchApi('/object_info');\nnode.evaluate(1);\nfetch(api.apiURL('/view'));\n")
    assert rp.scan_file(f) == [] and rp.scan_file(g) == []


def test_a_violation_planted_in_a_shipped_folder_fails_the_archive_scan(tmp_path):
    """End to end on a git repository laid out like the pack, with this .comfyignore: a flagged call in
    nodes/ is found; the same call in tests/ and scripts/ is left out of the archive with its folder."""
    (tmp_path / ".comfyignore").write_text((REPO / ".comfyignore").read_text())
    (tmp_path / "pyproject.toml").write_text("[tool.comfy]\nincludes = []\n")
    for rel in ("nodes/bad.py", "tests/test_x.py", "scripts/tool.py", "p3s_core/cli/main.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("import subprocess\nsubprocess.run(['pip', 'install', 'x'])\n")
    (tmp_path / "nodes" / "ok.py").write_text("x = 1\n")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "add", "-A"], check=True)
    files = rp.archive_files(tmp_path)
    assert files == ["nodes/bad.py", "nodes/ok.py", "pyproject.toml"]
    hits = rp.scan(tmp_path, files)
    assert {h.path for h in hits} == {"nodes/bad.py"} and len(hits) >= 2
