"""The harness's process safety, without ComfyUI: the parent-death signal, and which stale processes the
start of a server reaps (only this harness's own ones whose owner is gone; never another process)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import harness

SLEEP = [sys.executable, "-c", "import time; time.sleep(120)"]


def _wait_gone(pid: int, timeout: float = 15) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if harness._start_ticks(pid) is None:
            return True
        time.sleep(0.1)
    return False


def test_child_dies_with_its_killed_parent(tmp_path):
    """A process started with die_with_parent() gets SIGKILL when its parent is SIGKILLed."""
    pid_file = tmp_path / "grandchild"
    code = (f"import subprocess, sys, time; sys.path.insert(0, {str(harness.REPO / 'scripts')!r}); import harness;"
            f"p = subprocess.Popen({SLEEP!r}, preexec_fn=harness.die_with_parent());"
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.time() + 30
        while not (pid_file.exists() and pid_file.read_text()):
            assert time.time() < deadline and parent.poll() is None
            time.sleep(0.1)
        child = int(pid_file.read_text())
        assert harness._start_ticks(child) is not None
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        assert _wait_gone(child), "the child outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()


def test_reap_only_marked_processes_whose_owner_is_gone():
    dead = subprocess.Popen(["true"])
    dead.wait()
    me, ticks = harness.owner_token().split(":")
    procs = {
        "owner gone": {harness.SERVER_MARK: f"{dead.pid}:1"},
        "owner pid reused": {harness.SERVER_MARK: f"{me}:{int(ticks) + 1}"},
        "owner alive": {harness.SERVER_MARK: harness.owner_token()},
        "no mark": {},
        "not a harness token": {harness.SERVER_MARK: "someone else's"},
    }
    started = {k: subprocess.Popen(SLEEP, env=dict(os.environ, **extra)) for k, extra in procs.items()}
    try:
        reaped = harness.reap_stale_servers()
        for name in ("owner gone", "owner pid reused"):
            assert started[name].pid in reaped, name
            assert started[name].wait(10) == -signal.SIGTERM, name
        for name in ("owner alive", "no mark", "not a harness token"):
            assert started[name].pid not in reaped and started[name].poll() is None, name
    finally:
        for p in started.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def test_server_processes_are_started_the_harness_way(tmp_path, monkeypatch):
    """popen_server: own session (process group), the mark naming this process, the parent-death signal."""
    monkeypatch.setenv("P3S_COMFYUI", str(tmp_path))
    proc = harness.popen_server(SLEEP, tmp_path / "log")
    try:
        assert os.getpgid(proc.pid) == proc.pid and os.getsid(proc.pid) == proc.pid
        env = open(f"/proc/{proc.pid}/environ", "rb").read().split(b"\0")
        assert f"{harness.SERVER_MARK}={harness.owner_token()}".encode() in env
        status = open(f"/proc/{proc.pid}/status").read()
        assert harness.stale_servers().count(proc.pid) == 0  # its owner (this process) is alive
        assert "\nPPid:\t%d\n" % os.getpid() in status
    finally:
        proc.kill()
        proc.wait()
