"""Result files of the measurements the README and docs/ quote (issue 24 item 2).

Every producer (a script that measures a figure the documentation states) writes one JSON object
through :func:`write`: its own keys plus a stamp (``date``, ``command``, ``machine``) saying when, how
and where it was measured, so ``scripts/readme_figures.py`` can render the figure *and* its provenance.

    from results_file import write          # scripts/ on sys.path
    write("reference_cost", {"size": 256, ...})   # -> benchmarks/results/reference_cost.json

Needs only the standard library (torch's version is read if torch is already imported or importable).
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def command_line(argv: list[str] | None = None) -> str:
    """The command as a reader reruns it: the script's path relative to the repository, then its arguments."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]) if argv else Path("?")
    try:
        script = script.resolve().relative_to(REPO)
    except ValueError:
        pass
    return shlex.join([script.as_posix(), *argv[1:]])


def _first(path: str, prefix: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_facts() -> dict:
    """CPU model, cores, RAM, torch version and thread count of this machine."""
    mem_kib = _first("/proc/meminfo", "MemTotal")
    facts = {"cpu": _first("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
             "cores": os.cpu_count(),
             "ram_gib": round(int(mem_kib.split()[0]) / 2**20, 1) if mem_kib else None,
             "python": platform.python_version(), "os": f"{platform.system()} {platform.release()}"}
    try:
        import torch
    except ImportError:
        return {**facts, "torch": None}
    return {**facts, "torch": torch.__version__, "threads": torch.get_num_threads()}


def stamp(argv: list[str] | None = None) -> dict:
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": command_line(argv), "machine": machine_facts()}


def path_for(name_or_path: str | os.PathLike) -> Path:
    """``"x"`` -> ``benchmarks/results/x.json``; a path with a folder or a suffix is kept as given."""
    p = Path(name_or_path)
    return p if (p.suffix or len(p.parts) > 1) else RESULTS / f"{p}.json"


def write(name_or_path: str | os.PathLike, result: dict, argv: list[str] | None = None) -> Path:
    """Write ``result`` with its stamp (the stamp's keys win over the result's) as indented JSON."""
    out = path_for(name_or_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, **stamp(argv)}, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {out}", flush=True)
    return out
