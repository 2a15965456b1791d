"""The inner pytest session of ``test_sessions.py::test_pytest_killed_mid_run_leaves_no_server``.

Not collected by a normal run (no ``test_`` prefix); that test runs it as a pytest process of its own:
it starts the real server through the ``server`` fixture, reports the PIDs and port, then waits to be
killed with SIGKILL (it never ends by itself within the outer test's time).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest


def test_hold_a_server_until_killed(server):
    probe = os.environ.get("P3S_KILL_PROBE")
    if not probe:
        pytest.fail("only run by tests/integration/test_sessions.py (P3S_KILL_PROBE is not set)")
    assert server.proc.poll() is None
    tmp = Path(probe + ".tmp")
    tmp.write_text(json.dumps({"pytest_pid": os.getpid(), "server_pid": server.proc.pid, "port": server.port}))
    os.replace(tmp, probe)
    time.sleep(900)
    pytest.fail("was not killed")
