"""No test run can take the machine down or leave a ComfyUI server behind.

- ``scripts/test.sh`` runs any selection in two pytest sessions (not server/browser, then server/browser),
  so the in-process SD1.5 and a server's SD1.5 are never in memory together; ``tests/conftest.py`` refuses
  a single session that would hold both.
- A pytest process killed with SIGKILL while its server runs leaves no server process: the kernel kills
  the server (parent-death signal), checked here with a real pytest, a real server and a real SIGKILL.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import harness

REPO = Path(__file__).resolve().parents[2]
PYTEST = [sys.executable, "-m", "pytest", "-c", "tests/pytest.ini", "--rootdir", "tests", "-p", "no:cacheprovider"]
# one in-process test and one server test of test_harness.py: a mixed selection
IN_PROCESS = "test_random_sd15_loads_as_sd15"
SERVED = "test_server_serves_pack_js"
MIXED = f"{IN_PROCESS} or {SERVED}"


def run(cmd, timeout=600, **kw) -> subprocess.CompletedProcess:
    # --setup-plan: the sessions are collected and planned but no fixture or test runs (nothing loads)
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, timeout=timeout,
                          preexec_fn=harness.die_with_parent(), **kw)


def test_one_session_with_in_process_and_server_tests_is_refused():
    env = {k: v for k, v in os.environ.items() if k != "P3S_ONE_SESSION"}
    proc = run([*PYTEST, "tests/integration/test_harness.py", "-k", MIXED, "--setup-plan"], env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 4, out[-3000:]  # pytest's usage error: nothing ran
    assert "both SD1.5s would be in memory at once" in out and "scripts/test.sh" in out, out[-3000:]
    assert IN_PROCESS in out and SERVED in out
    # either half alone is accepted
    for mark, name in (("not server and not browser", IN_PROCESS), ("server or browser", SERVED)):
        ok = run([*PYTEST, "tests/integration/test_harness.py", "-k", MIXED, "-m", mark, "--setup-plan"], env=env)
        assert ok.returncode == 0 and name in ok.stdout, (mark, (ok.stdout + ok.stderr)[-3000:])


@pytest.mark.parametrize("extra", [[], ["-m", "slow"], ["tests/integration/test_harness.py"]],
                         ids=["no_mark", "with_mark", "with_path"])
def test_test_sh_runs_a_mixed_selection_in_two_sessions(extra):
    proc = run(["bash", "scripts/test.sh", "-k", MIXED, "--setup-plan", "-q", *extra], stderr=subprocess.STDOUT)
    out = proc.stdout  # with stderr, in order
    assert proc.returncode == 0, out[-4000:]  # neither session was refused as mixed
    first = out.index("session 1 of 2")
    second = out.index("session 2 of 2")
    assert first < second
    # each test is planned once, in its own session
    assert out.count(f"::{IN_PROCESS}") == 1 and out.count(f"::{SERVED}") == 1, out[-4000:]
    assert first < out.index(f"::{IN_PROCESS}") < second < out.index(f"::{SERVED}"), out[-4000:]
    if "-m" in extra:
        assert '-m "(slow) and not server and not browser"' in out and '-m "(slow) and (server or browser)"' in out


def _gone(pid: int) -> bool:
    return harness._start_ticks(pid) is None  # no such process, or a zombie (it has ended)


def _answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
@pytest.mark.server
def test_pytest_killed_mid_run_leaves_no_server(tmp_path):
    probe = tmp_path / "probe.json"
    log = open(tmp_path / "inner.log", "wb")
    inner = subprocess.Popen([*PYTEST, "-q", "-s", "--basetemp", str(tmp_path / "inner"),
                              "tests/integration/kill_probe_session.py"], cwd=REPO, stdout=log,
                             stderr=subprocess.STDOUT, env=dict(os.environ, P3S_KILL_PROBE=str(probe)),
                             preexec_fn=harness.die_with_parent())
    log.close()
    try:
        deadline = time.time() + 300
        while not probe.exists():
            assert inner.poll() is None, (tmp_path / "inner.log").read_text()[-4000:]
            assert time.time() < deadline, "the inner session did not start its server"
            time.sleep(0.5)
        info = json.loads(probe.read_text())
        server_pid, port = info["server_pid"], info["port"]
        assert info["pytest_pid"] == inner.pid
        # the real server is up, a child of the inner pytest, and carries the harness's mark
        assert not _gone(server_pid) and _answers(port)
        stat = Path(f"/proc/{server_pid}/stat").read_text()
        assert int(stat[stat.rindex(")") + 2:].split()[1]) == inner.pid
        assert f"{harness.SERVER_MARK}={inner.pid}:".encode() in Path(f"/proc/{server_pid}/environ").read_bytes()
        os.kill(inner.pid, signal.SIGKILL)
        assert inner.wait(timeout=30) == -signal.SIGKILL
        deadline = time.time() + 30
        while (not _gone(server_pid) or _answers(port)) and time.time() < deadline:
            time.sleep(0.2)
        assert _gone(server_pid), f"server {server_pid} outlived its killed pytest"
        assert not _answers(port), f"port {port} still answers after its server ended"
        # and nothing else of that run's servers is left (their children carry the same mark)
        left = [pid for pid in harness.stale_servers() if f"{harness.SERVER_MARK}={inner.pid}:".encode()
                in Path(f"/proc/{pid}/environ").read_bytes()]
        assert left == []
    finally:
        if inner.poll() is None:
            inner.kill()
            inner.wait()
