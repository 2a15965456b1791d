"""The Comfy Registry archive: which files it holds, and a scan of them for what the registry flags.

    python scripts/registry_package.py            # list the archive's files and scan them; exit 1 on a hit
    python scripts/registry_package.py --zip OUT  # also write the archive (as `comfy node pack` would)

How the registry's CLI selects files (comfy-cli, ``comfy node pack`` / ``comfy node publish``, its
``zip_files``): the files ``git ls-files`` lists (tracked files only), minus those matched by the
patterns of ``.comfyignore`` (gitignore syntax; blank lines and ``#`` comments dropped, each line
stripped), plus the folders named in ``[tool.comfy] includes`` (this pack names none). Here git
itself applies the patterns (``git ls-files --ignored --exclude-from``), the reference implementation
of the gitignore syntax that comfy-cli's ``pathspec`` "gitwildmatch" follows. Untracked files that
.gitignore does not hide are added too, so a new file is scanned before it is committed.

What the registry flags (docs.comfy.org/registry/standards: eval/exec, subprocess for pip install,
obfuscation; its scanner also flags other system calls and network code), looked for here:
* Python, by its syntax tree (not grep, so ``model.eval()`` is no hit): imports of ``subprocess``,
  ``socket``, ``ssl``, ``urllib``/``urllib3``, ``requests``, ``httpx``, ``aiohttp``, ``http``
  (``http.client``/``http.server``), ``ftplib``, ``smtplib``, ``telnetlib``, ``websocket(s)``,
  ``pty``, ``pip``; calls of the builtins ``eval``, ``exec``, ``compile``, ``__import__``; calls of
  ``os.system``, ``os.popen``, ``os.exec*``, ``os.spawn*``, ``os.posix_spawn*``, ``os.startfile``;
  string constants that run pip (``pip install``, ``-m pip``, ``ensurepip``).
* JavaScript, by pattern: ``eval(``, ``new Function(``, ``XMLHttpRequest``, ``WebSocket(``, and
  ``fetch`` of an absolute ``http(s)://`` address (the widget talks only to its own ComfyUI).
Standard library only.
"""
from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IGNORE_FILE = ".comfyignore"

NETWORK_OR_PROCESS_MODULES = {
    "subprocess", "socket", "ssl", "urllib", "urllib3", "requests", "httpx", "aiohttp", "http",
    "ftplib", "smtplib", "telnetlib", "websocket", "websockets", "pty", "pip", "ensurepip",
}
FLAGGED_BUILTINS = {"eval", "exec", "compile", "__import__"}
FLAGGED_OS = re.compile(r"^(system|popen|startfile|exec\w*|spawn\w*|posix_spawn\w*)$")
PIP_TEXT = re.compile(r"\bpip3?\s+install\b|-m\s*['\"]?\s*,?\s*['\"]?pip\b|\bensurepip\b")
JS_PATTERNS = {
    "eval(": re.compile(r"(?<![\w.$])eval\s*\("),
    "new Function(": re.compile(r"\bnew\s+Function\s*\("),
    "XMLHttpRequest": re.compile(r"\bXMLHttpRequest\b"),
    "WebSocket(": re.compile(r"\bnew\s+WebSocket\s*\("),
    "fetch of an absolute address": re.compile(r"\bfetch\s*\(\s*[`'\"]https?://"),
}


@dataclass(frozen=True)
class Hit:
    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def _git(repo: Path, *args: str) -> list[str]:
    out = subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.strip()]


def ignore_patterns(repo: Path = REPO) -> list[str]:
    """The patterns as comfy-cli reads them: stripped lines, without blanks and ``#`` comments."""
    path = repo / IGNORE_FILE
    if not path.exists():
        return []
    return [s.strip() for s in path.read_text(encoding="utf-8").splitlines()
            if s.strip() and not s.lstrip().startswith("#")]


def tool_comfy_includes(repo: Path = REPO) -> list[str]:
    data = tomllib.loads((repo / "pyproject.toml").read_text(encoding="utf-8"))
    return list(data.get("tool", {}).get("comfy", {}).get("includes", []) or [])


def archive_files(repo: Path = REPO, with_untracked: bool = True) -> list[str]:
    """Paths (relative, ``/``-separated) of the files the registry archive would hold."""
    repo = Path(repo)
    files = set(_git(repo, "ls-files", "--cached"))
    if with_untracked:
        files |= set(_git(repo, "ls-files", "--others", "--exclude-standard"))
    patterns = ignore_patterns(repo)
    if patterns:
        # git reads the patterns from a file; the stripped form is what comfy-cli matches with.
        with tempfile.TemporaryDirectory() as tmp:
            listed = Path(tmp) / "comfyignore"
            listed.write_text("\n".join(patterns) + "\n", encoding="utf-8")
            ignored = set(_git(repo, "ls-files", "--cached", "--others", "--ignored",
                               f"--exclude-from={listed}"))
        files -= ignored
    files = {f for f in files if (repo / f).is_file()}
    for inc in tool_comfy_includes(repo):
        base = repo / inc.lstrip("/")
        found = [base] if base.is_file() else [p for p in base.rglob("*") if p.is_file()]
        files |= {p.relative_to(repo).as_posix() for p in found}
    return sorted(files)


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def scan_python(source: str, path: str = "<string>") -> list[Hit]:
    hits: list[Hit] = []
    tree = ast.parse(source, filename=path)
    os_names = {"os"}  # names the os module is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in NETWORK_OR_PROCESS_MODULES:
                    hits.append(Hit(path, node.lineno, f"import {alias.name}"))
                if alias.name == "os" and alias.asname:
                    os_names.add(alias.asname)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in NETWORK_OR_PROCESS_MODULES:
                hits.append(Hit(path, node.lineno, f"from {node.module} import ..."))
            if node.module == "os":
                for alias in node.names:
                    if FLAGGED_OS.match(alias.name):
                        hits.append(Hit(path, node.lineno, f"from os import {alias.name}"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in FLAGGED_BUILTINS or name in {f"builtins.{b}" for b in FLAGGED_BUILTINS}:
                hits.append(Hit(path, node.lineno, f"{name}(...) call"))
            head, _, tail = name.rpartition(".")
            if head in os_names and FLAGGED_OS.match(tail):
                hits.append(Hit(path, node.lineno, f"{name}(...) call"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and PIP_TEXT.search(node.value):
            hits.append(Hit(path, node.lineno, f"runs pip: {node.value[:60]!r}"))
        elif isinstance(node, (ast.List, ast.Tuple)):  # an argv such as [sys.executable, "-m", "pip", "install"]
            words = [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            if "install" in words and any(w in {"pip", "pip3"} or w.endswith(("/pip", "/pip3")) for w in words):
                hits.append(Hit(path, node.lineno, f"runs pip: {words[:6]}"))
    return hits


def scan_javascript(source: str, path: str = "<string>") -> list[Hit]:
    hits = []
    for no, line in enumerate(source.splitlines(), 1):
        for what, rx in JS_PATTERNS.items():
            if rx.search(line):
                hits.append(Hit(path, no, what))
    return hits


def scan_file(path: Path, rel: str | None = None) -> list[Hit]:
    rel = rel or path.name
    if path.suffix == ".py":
        return scan_python(path.read_text(encoding="utf-8"), rel)
    if path.suffix in {".js", ".mjs", ".cjs"}:
        return scan_javascript(path.read_text(encoding="utf-8"), rel)
    return []


def scan(repo: Path = REPO, files: list[str] | None = None) -> list[Hit]:
    files = archive_files(repo) if files is None else files
    return [hit for f in files for hit in scan_file(Path(repo) / f, f)]


def write_zip(out: Path, repo: Path = REPO, files: list[str] | None = None) -> Path:
    files = archive_files(repo, with_untracked=False) if files is None else files
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in files:
            zf.write(Path(repo) / f, f)
    return Path(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zip", type=Path, help="also write the archive (tracked files only) here")
    args = ap.parse_args(argv)
    files = archive_files()
    print("\n".join(files))
    hits = scan(files=files)
    print(f"[registry] {len(files)} files; {len(hits)} flagged", file=sys.stderr)
    for hit in hits:
        print(f"[registry] FLAGGED {hit}", file=sys.stderr)
    if args.zip:
        write_zip(args.zip)
    return 1 if hits else 0


if __name__ == "__main__":
    sys.exit(main())
