"""``p3s train-many`` across two CPU processes (gloo) under ``accelerate launch`` and ``torchrun``:
every subject trained exactly once, adapters byte-identical to a single-process run with the same
seed, and a killed process's subjects finished by a rerun. Tiny local models (tests/tiny_sd.py)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tiny_sd  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SUBJECTS = ["a", "b", "c", "d", "e", "f"]  # rank 0: a c e, rank 1: b d f

pytestmark = pytest.mark.slow  # several process launches (about three minutes on 2 CPUs)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    m = tiny_sd.build(root)
    for i, s in enumerate(SUBJECTS):
        tiny_sd.photos(root / "subjects" / s, n=2, seed=10 + i)
    (root / "subjects" / "c" / "prompt.txt").write_text("a photo of sks teapot\n")
    return root, m


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


def _args(root, m, out):
    return ["train-many", str(root / "subjects"), "--out", str(out), "--model", str(m["model"]),
            "--clip-vision", str(m["clip_vision"]), "--epochs", "1", "--resolution", "64",
            "--threads", "1", "--device", "cpu"]


def _run(cmd, **env):
    r = subprocess.run(cmd, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _log(out: Path) -> Counter:
    lines = (out / "p3s_many_log.jsonl").read_text().splitlines()
    return Counter(json.loads(line)["subject"] for line in lines)


@pytest.fixture(scope="module")
def reference(setup):
    root, m = setup
    out = root / "single"
    _run([sys.executable, "-m", "p3s", *_args(root, m, out)])
    assert _log(out) == Counter({s: 1 for s in SUBJECTS})
    return out


def _same_as_reference(out: Path, ref: Path):
    for s in SUBJECTS:
        assert (out / f"{s}.safetensors").read_bytes() == (ref / f"{s}.safetensors").read_bytes(), s


def test_accelerate_two_cpu_processes(setup, reference):
    root, m = setup
    out = root / "accelerate"
    r = _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_port()), "-m", "p3s", *_args(root, m, out)])
    assert "rank 0/2" in r.stdout and "rank 1/2" in r.stdout
    log = [json.loads(x) for x in (out / "p3s_many_log.jsonl").read_text().splitlines()]
    assert Counter(x["subject"] for x in log) == Counter({s: 1 for s in SUBJECTS})
    assert {x["subject"]: x["rank"] for x in log} == {s: i % 2 for i, s in enumerate(SUBJECTS)}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] == len(SUBJECTS) and summary["missing"] == [] and summary["world_size"] == 2
    assert summary["subjects"]["c"]["prompt"] == "a photo of sks teapot"
    assert summary["subjects"]["a"]["prompt"] == "a photo of sks a"
    _same_as_reference(out, reference)


def test_killed_process_is_finished_by_a_torchrun_rerun(setup, reference):
    root, m = setup
    out = root / "killed"
    cmd = [sys.executable, "-m", "p3s", *_args(root, m, out)]
    # two ranks without a process group; rank 1 is killed once its first adapter is written
    procs = [subprocess.Popen(cmd, cwd=REPO, env=_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for r in (0, 1)]
    try:
        deadline = time.time() + 600
        while not ((out / "p3s_many_log.jsonl").exists() and _log(out)["b"] == 1):
            assert time.time() < deadline and procs[1].poll() is None, "rank 1 never wrote its first adapter"
            time.sleep(0.02)
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait(60)
        assert procs[0].wait(600) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    left = [s for s in ("d", "f") if not (out / f"{s}.safetensors").exists()]
    assert left, "the kill came too late to leave work undone"
    from p3s_core.adapter import load_adapter

    for s in SUBJECTS:  # whatever exists under a final name is a whole adapter (atomic writes)
        if (out / f"{s}.safetensors").exists():
            assert load_adapter(out / f"{s}.safetensors").training_info["steps"] == 2
    before = {s: (out / f"{s}.safetensors").stat().st_mtime_ns for s in SUBJECTS
              if (out / f"{s}.safetensors").exists()}
    r = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
              "--master_port", str(_port()), "-m", "p3s", *_args(root, m, out)])
    assert "already complete" in r.stdout
    counts = _log(out)
    assert counts == Counter({s: 1 for s in SUBJECTS}), counts  # nothing trained twice
    for s, t in before.items():
        assert (out / f"{s}.safetensors").stat().st_mtime_ns == t, f"{s} was rewritten"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] == len(SUBJECTS) and summary["world_size"] == 2
    _same_as_reference(out, reference)


def test_an_idle_rank_never_waits_in_a_collective_and_a_rerun_writes_the_summary(setup, tmp_path):
    """One subject, two ranks under torchrun (gloo): rank 1 has nothing to do and rank 0 trains for
    longer than the process group's timeout (1 s here). Completion goes through files, so nobody
    times out; a rerun with nothing left exits 0 and writes the summary again."""
    root, m = setup
    one = tmp_path / "one"
    tiny_sd.photos(one / "solo", n=2, seed=21)
    out = tmp_path / "out"
    args = ["train-many", str(one), "--out", str(out), "--model", str(m["model"]),
            "--clip-vision", str(m["clip_vision"]), "--epochs", "20", "--resolution", "64", "--threads", "1",
            "--device", "cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
           "-m", "p3s", *args]
    r = _run(cmd, P3S_DIST_TIMEOUT_S="1")
    assert "rank 1/2: 0 subject(s)" in r.stdout
    log = [json.loads(x) for x in (out / "p3s_many_log.jsonl").read_text().splitlines()]
    assert [(x["subject"], x["rank"]) for x in log] == [("solo", 0)]
    assert log[0]["seconds"] > 1  # rank 0 trained for longer than the group's timeout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] == 1 and summary["missing"] == []
    assert not list((out / ".p3s_ranks").glob("*"))  # the completion marks are cleaned up
    (out / "summary.json").unlink()
    r = _run(cmd[:6] + [str(_port())] + cmd[7:], P3S_DIST_TIMEOUT_S="1")
    assert "1 already complete" in r.stdout
    assert json.loads((out / "summary.json").read_text())["complete"] == 1
    assert len((out / "p3s_many_log.jsonl").read_text().splitlines()) == 1  # nothing trained twice
