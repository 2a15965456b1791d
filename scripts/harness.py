"""Run the real ComfyUI with this pack: base folders, the server process, prompts and workflows.

Shared by ``scripts/run.py`` (the README's run command) and the test suite (``tests/conftest.py``).
Standard library only, so it works before and outside the venv's extras.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACK_LINK_NAME = "comfyui-p3s"
MODEL_KINDS = ("checkpoints", "clip_vision", "controlnet")
# The example workflows name the usual SD1.5 files; in the random-weight demo folder these names are
# links to the random files, so the shipped workflows run as they are (their images are noise).
DEMO_ALIASES = {
    "checkpoints": {"v1-5-pruned-emaonly.safetensors": "p3s_random_sd15.safetensors"},
    "clip_vision": {"clip-vit-large-patch14.safetensors": "p3s_random_clip_vit_l14.safetensors"},
    "controlnet": {"control_v11p_sd15_canny.safetensors": "p3s_random_controlnet_sd15.safetensors"},
}
EXAMPLE_INPUTS = REPO / "workflows" / "input"


class HarnessError(RuntimeError):
    pass


def env_path(name: str) -> Path:
    """A path that ``scripts/setup.sh`` printed (exported by ``scripts/test.sh`` / ``run.sh``)."""
    value = os.environ.get(name)
    if not value or not Path(value).exists():
        raise HarnessError(f"{name} is not set or does not exist ({value!r}): run through scripts/test.sh "
                           "or scripts/run.sh, which run scripts/setup.sh first")
    return Path(value)


def comfyui_dir() -> Path:
    return env_path("P3S_COMFYUI")


def random_models_dir() -> Path:
    return env_path("P3S_RANDOM_MODELS")


def make_base_dir(base: Path, models_dir: Path | None = None, pack_dir: Path = REPO) -> Path:
    """A ComfyUI ``--base-directory``: ``custom_nodes/`` links this pack, ``models/`` holds the models.

    ``models_dir`` None: the generated random-weight models are linked in (their images are noise).
    Otherwise ``models/`` is a link to the user's own models folder (adapters are saved there too).
    """
    base = Path(base)
    for sub in ("custom_nodes", "input", "output", "user", "temp"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_LINK_NAME
    if link.is_symlink() or link.exists():
        if link.resolve() != Path(pack_dir).resolve():
            link.unlink()
    if not link.exists():
        link.symlink_to(Path(pack_dir).resolve(), target_is_directory=True)
    models = base / "models"
    if models_dir is not None:
        if models.is_symlink():
            models.unlink()
        elif models.exists():
            shutil.rmtree(models)
        models.symlink_to(Path(models_dir).resolve(), target_is_directory=True)
    else:
        if models.is_symlink():
            models.unlink()
        source = random_models_dir()
        for kind in MODEL_KINDS:
            (models / kind).mkdir(parents=True, exist_ok=True)
            for f in (source / kind).glob("*.safetensors"):
                target = models / kind / f.name
                if not target.exists():
                    target.symlink_to(f)
            for alias, name in DEMO_ALIASES[kind].items():
                target = models / kind / alias
                if not target.exists() and (source / kind / name).exists():
                    target.symlink_to(source / kind / name)
        (models / "p3s").mkdir(parents=True, exist_ok=True)
    for f in EXAMPLE_INPUTS.glob("*.png"):  # the example workflows' reference photo
        if not (base / "input" / f.name).exists():
            shutil.copyfile(f, base / "input" / f.name)
    return base


def boot_in_process(base: Path, cpu: bool = True):
    """The real ComfyUI imported in this process (CPU) with this pack loaded by ComfyUI's own loader.

    Returns ``(nodes module, pack module)``. Order matters: ComfyUI first on ``sys.path`` (its
    top-level ``nodes``/``utils`` must win over this repo's ``nodes`` package), ``args`` set before
    ``folder_paths`` is imported, ``utils.extra_config`` before ``nodes``.
    """
    import asyncio
    import importlib

    comfy_dir = comfyui_dir()
    sys.path.insert(0, str(comfy_dir))
    for name in [m for m in sys.modules if m == "nodes" or m.startswith("nodes.")]:
        del sys.modules[name]
    cli_args = importlib.import_module("comfy.cli_args")
    cli_args.args.cpu = cpu
    cli_args.args.base_directory = str(base)
    importlib.import_module("folder_paths")
    importlib.import_module("utils.extra_config")
    nodes = importlib.import_module("nodes")
    if Path(nodes.__file__).resolve().parent != comfy_dir.resolve():
        raise HarnessError(f"imported the wrong 'nodes' module: {nodes.__file__}")
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    pack_path = str(Path(base) / "custom_nodes" / PACK_LINK_NAME)
    if not asyncio.run(nodes.load_custom_node(pack_path)):
        raise HarnessError("ComfyUI's loader could not import this pack (see the log above)")
    return nodes, sys.modules[pack_path.replace(".", "_x_")]


# --- server processes: never left behind ----------------------------------------------------------
# Every ComfyUI server this harness starts (tests, scripts/run.py, scripts/gpu_check.py) runs in its own
# process group (its own session), gets SIGKILL from the kernel when the process that started it dies
# (Linux prctl PR_SET_PDEATHSIG, even when that process is SIGKILLed), and carries SERVER_MARK in its
# environment: "<owner pid>:<owner start time>". A server whose owner is gone is stale: the next start
# kills it (reap_stale_servers). Only processes of this user that carry the mark are ever looked at, and
# only those whose owner (pid and start time, so a reused pid does not count) no longer runs are killed,
# so other users' ComfyUIs and servers of test runs still going are never touched.
SERVER_MARK = "P3S_HARNESS_SERVER"
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _start_ticks(pid: int) -> int | None:
    """The start time of ``pid`` (clock ticks after boot, /proc/PID/stat field 22); None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    if fields[0] == "Z":  # a zombie has finished: only its exit status is left
        return None
    return int(fields[19])


def owner_token(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{_start_ticks(pid)}"


def _owner_alive(token: str) -> bool:
    pid, _, ticks = token.partition(":")
    try:
        return _start_ticks(int(pid)) == int(ticks)
    except ValueError:  # not a token this harness wrote: leave the process alone
        return True


def die_with_parent(sig: int = signal.SIGKILL):
    """A ``preexec_fn``: the child gets ``sig`` when the thread that started it ends (Linux only).

    Call ``Popen`` from the main thread (the kernel watches the forking thread, not the process)."""
    if _LIBC is None:
        return None
    parent = os.getpid()

    def preexec():
        if _LIBC.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            os._exit(127)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(127)

    return preexec


def stale_servers() -> list[int]:
    """PIDs of this user's processes that carry SERVER_MARK and whose owner no longer runs."""
    found = []
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    uid = os.getuid()
    mark = SERVER_MARK.encode() + b"="
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        token = next((v[len(mark):].decode(errors="replace") for v in env.split(b"\0") if v.startswith(mark)), None)
        if token is not None and _start_ticks(int(entry.name)) is not None and not _owner_alive(token):
            found.append(int(entry.name))
    return found


def _signal_same_process(pid: int, ticks: int, sig: int) -> None:
    """Send ``sig`` to ``pid`` only while it is still the process that started at ``ticks`` (a pid freed
    and reused by another process in between is left alone: pidfd where the kernel has it)."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    try:
        if _start_ticks(pid) != ticks:
            return
        if fd is not None:
            signal.pidfd_send_signal(fd, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass
    finally:
        if fd is not None:
            os.close(fd)


def reap_stale_servers(timeout: float = 10.0) -> list[int]:
    """Stop the stale servers of this harness (see ``stale_servers``): SIGTERM, then SIGKILL."""
    pids = stale_servers()
    started = {pid: _start_ticks(pid) for pid in pids}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, ticks in started.items():
            _signal_same_process(pid, ticks, sig)
        deadline = time.time() + timeout
        while time.time() < deadline and any(_start_ticks(pid) == t for pid, t in started.items()):
            time.sleep(0.1)
    if pids:
        print(f"[p3s-harness] stopped {len(pids)} stale ComfyUI server process(es) of this harness: {pids}",
              file=sys.stderr)
    return pids


def popen_server(cmd: list[str], log_path: Path) -> subprocess.Popen:
    """Start a ComfyUI server process the harness way (stale ones reaped first; see SERVER_MARK)."""
    reap_stale_servers()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env[SERVER_MARK] = owner_token()
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, cwd=comfyui_dir(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, preexec_fn=die_with_parent())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ComfyServer:
    """The real ComfyUI server (``main.py --cpu``) on 127.0.0.1, stopped by PID (and by the kernel
    when the process that started it dies: see ``popen_server``)."""

    base: Path
    port: int = 0
    python: str = sys.executable
    log_path: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        if not self.port:
            self.port = free_port()
        self.log_path = self.log_path or (Path(self.base) / f"server-{self.port}.log")
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--base-directory", str(self.base),
               "--database-url", "sqlite:///:memory:", *self.extra_args]
        self.proc = popen_server(cmd, self.log_path)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise HarnessError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise HarnessError(f"ComfyUI did not answer within {timeout:.0f}s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=20)

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace") if self.log_path and Path(self.log_path).exists() else ""

    # --- HTTP ------------------------------------------------------------------------------------
    def request(self, method: str, path: str, body=None, timeout: float = 30):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    def get(self, path: str, timeout: float = 30):
        return self.request("GET", path, timeout=timeout)

    def post(self, path: str, body, timeout: float = 30):
        return self.request("POST", path, body, timeout=timeout)

    def queue(self, prompt: dict) -> str:
        """POST an API-format graph; returns the prompt id. Validation errors raise HarnessError."""
        try:
            answer = self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
        except urllib.error.HTTPError as e:
            raise HarnessError(f"prompt refused ({e.code}): {e.read().decode(errors='replace')}") from None
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        """Poll ``/history/{id}`` until the prompt ends; returns its history entry."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                hist = self.get(f"/history/{prompt_id}", timeout=60)
            except (TimeoutError, urllib.error.URLError, ConnectionError) as e:
                if self.proc is not None and self.proc.poll() is not None:
                    raise HarnessError(f"ComfyUI died while running {prompt_id}:\n{self.log()[-4000:]}") from e
                time.sleep(1)  # a busy server (training on the CPU) may answer slowly
                continue
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise HarnessError(f"ComfyUI died while running {prompt_id}:\n{self.log()[-4000:]}")
            time.sleep(0.3)
        raise HarnessError(f"prompt {prompt_id} did not finish within {timeout:.0f}s")

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        entry = self.wait(self.queue(prompt), timeout)
        if entry["status"]["status_str"] != "success":
            raise HarnessError("prompt failed: " + json.dumps(entry["status"].get("messages", []))[-4000:])
        return entry

    def output_files(self, entry: dict) -> list[Path]:
        """Files the prompt wrote to the output folder (images and other ``ui`` files)."""
        files = []
        for node_out in entry.get("outputs", {}).values():
            for items in node_out.values():
                if not isinstance(items, list):
                    continue
                for item in items:
                    if isinstance(item, dict) and "filename" in item and item.get("type", "output") == "output":
                        files.append(Path(self.base) / "output" / item.get("subfolder", "") / item["filename"])
        return files


# --- UI-format workflows -> API-format prompts ---------------------------------------------------
_SKIP_TYPES = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
_SEED_CONTROL = {"fixed", "increment", "decrement", "randomize"}


def is_ui_workflow(data: dict) -> bool:
    return isinstance(data, dict) and "nodes" in data and "links" in data


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow (``nodes``/``links``) to an API-format prompt.

    Widget values are matched to the node's widget inputs in definition order, skipping the
    frontend's ``control_after_generate`` entry after seed-like INT widgets. Notes are dropped;
    Reroutes and PrimitiveNodes are followed to their source.
    """
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {}
    for link in workflow["links"]:
        if isinstance(link, dict):
            links[link["id"]] = (link["origin_id"], link["origin_slot"])
        else:
            links[link[0]] = (link[1], link[2])

    def source(link_id):
        origin, slot = links[link_id]
        node = nodes[origin]
        while node["type"] == "Reroute":
            origin, slot = links[node["inputs"][0]["link"]]
            node = nodes[origin]
        if node["type"] == "PrimitiveNode":
            return ("value", node["widgets_values"][0])
        return ("link", [str(origin), slot])

    prompt = {}
    for nid, node in nodes.items():
        if node["type"] in _SKIP_TYPES or node.get("mode", 0) in (2, 4):  # 2 muted, 4 bypassed
            continue
        info = object_info.get(node["type"])
        if info is None:
            raise HarnessError(f"node type {node['type']!r} (node {nid}) is not installed")
        inputs = {}
        linked = {i["name"]: i.get("link") for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        if isinstance(node.get("widgets_values"), dict):
            values = None
        order = list(info["input"].get("required", {}).items()) + list(info["input"].get("optional", {}).items())
        pos = 0
        for name, spec in order:
            kind = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            is_widget = isinstance(kind, list) or (kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
                                                   and not opts.get("forceInput"))
            value = None
            if is_widget and values is not None and pos < len(values):
                value = values[pos]
                pos += 1
                seed_like = kind == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed"))
                if seed_like and pos < len(values) and values[pos] in _SEED_CONTROL:
                    pos += 1
            elif is_widget and values is None:
                value = node["widgets_values"].get(name)
            if name in linked:
                inputs[name] = source(linked[name])[1]
            elif is_widget and value is not None:
                inputs[name] = value
        # image upload widgets add an 'upload' value; hidden/extra values are ignored
        prompt[str(nid)] = {"class_type": node["type"], "inputs": inputs}
    return prompt
