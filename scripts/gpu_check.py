"""GPU check (issues 11.3, 14.3, 21.7): the pack on a CUDA machine, through the real ComfyUI server.

One command, unattended, writes one JSON (``--out``, rewritten after every phase, so a run cut short
keeps what it measured). Everything goes through ComfyUI's HTTP API (API-format prompts):

1. **Training** (once, Dynamic VRAM on): the P3S Trainer, 60 epochs x 5 photos at 512^2 (the
   paper's setting): the prompt's time (ComfyUI's own execution timestamps and the client's wall
   clock) and the server process's peak GPU memory (nvidia-smi, sampled every 0.25 s: includes the
   CUDA context and the caching allocator). Goals: <= 60 s on an H100/H200, <= 10 GB.
2. **Sampling**, per VRAM mode (``dynamic`` = ComfyUI 0.33's default on NVIDIA; ``legacy`` =
   ``--disable-dynamic-vram``), fp16 UNet (``--fp16-unet``): 512^2, DDIM, 50 steps, CFG 7.5, four
   variants: plain / + P3S Condition Injector / + ControlNet (``ControlNetApplyAdvanced``, strength 1,
   all steps) / + P3S + ControlNet. A warm-up round, then rounds in which every variant runs, the order
   reversed every other round. Per variant and round: an untimed 1-step prompt (ComfyUI switches the
   loaded model; its time is kept as ``switch_s``), a timed 1-step prompt and a timed 50-step prompt,
   all warm (only the KSampler and a SaveLatent run again: a new seed, everything above cached). Per
   step = (t50 - t1) / 49: the marginal cost of a step, without the fixed cost of a prompt. The
   ratio to plain is taken per round (variant / plain of the same round), then the median over
   rounds, with the spread (min, max); the ratio of whole 50-step prompts is kept beside it.
   Goals: P3S <= 1.25x a plain step and below ControlNet.
3. **Low VRAM**: a server per ``--lowvram MODE:GIB`` started with ``--reserve-vram`` = the card's
   total minus GIB, so at most GIB are left for models; the + P3S variant runs once (50 steps) and
   must complete. ComfyUI's load lines (loaded partially / completely, dynamic staging) of that prompt
   are recorded, and its latent is compared with the full-load run of the same seed.

    source scripts/env.sh --comfyui ../shared/comfyui/comfyui-0.33.0.tar.gz   # a CUDA torch venv
    $P3S_VENV/bin/python scripts/gpu_check.py --out benchmarks/results/gpu-NAME.json
    $P3S_VENV/bin/python scripts/gpu_check.py --epochs 2 --rounds 2 --lowvram "" --out /tmp/g.json  # quick
    $P3S_VENV/bin/python scripts/gpu_check.py --models /path/to/ComfyUI/models  # real weights

``--budget-s`` (default 0: none) makes the run fit a time limit: training gets what the later phases
leave it (interrupted past that, and a one-epoch adapter made instead), rounds stop at ``--min-rounds``
when time runs short, low-VRAM runs that would not fit are skipped; each cut is written in the JSON.
Random-weight models by default (``scripts/make_random_models.py``: SD1.5, CLIP ViT-L/14 vision, SD1.5
ControlNet), so the arithmetic is real and the images are noise.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

VARIANTS = ("plain", "p3s", "controlnet", "p3s+controlnet")
MODES = ("dynamic", "legacy")
GOALS = {"p3s_max_ratio": 1.25, "train_max_s": 60.0, "train_max_gib": 10.0}
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # ComfyUI colours its log levels
#: ComfyUI log lines about how models were loaded (kept verbatim for the low-VRAM runs)
LOAD_LINE = re.compile(r"loaded partially|loaded completely|Unloaded partially|models unloaded|lowvram|"
                       r"prepared for dynamic VRAM loading|Requested to load|offload|same device|"
                       r"out of memory|Traceback|Error", re.IGNORECASE)


# --- GPU memory -----------------------------------------------------------------------------------
class GpuPeak(threading.Thread):
    """Samples nvidia-smi: the GPU memory of one process (MiB) and of the whole card, until stopped."""

    def __init__(self, pid: int, period: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.peak = self.card_peak = self.samples = 0
        self._halt = threading.Event()  # not _stop: that name is Thread._stop(), called after a fork

    def reset(self):
        self.peak = self.card_peak = 0

    @staticmethod
    def _smi(*query: str) -> str:
        return subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"], capture_output=True,
                              text=True, timeout=10).stdout

    def run(self):
        while not self._halt.is_set():
            try:
                out = self._smi("--query-compute-apps=pid,used_memory")
                used = sum(int(m) for p, m in (line.split(",") for line in out.strip().splitlines() if "," in line)
                           if p.strip().isdigit() and int(p) == self.pid)
                card = self._smi("--query-gpu=memory.used").split()
                self.peak = max(self.peak, used)
                if card and card[0].isdigit():
                    self.card_peak = max(self.card_peak, int(card[0]))
                self.samples += 1
            except Exception:  # nvidia-smi hiccups: keep sampling
                pass
            self._halt.wait(self.period)

    def stop(self):
        self._halt.set()


def card_total_mib() -> int | None:
    try:
        out = GpuPeak._smi("--query-gpu=memory.total").split()
        return int(out[0]) if out and out[0].isdigit() else None
    except Exception:
        return None


# --- the server -----------------------------------------------------------------------------------
class Server:
    """One ComfyUI server (the pack linked in), its GPU sampler and its log."""

    def __init__(self, name: str, mode: str, args, extra: list[str], log_dir: Path | None = None):
        self.name, self.mode = name, mode
        self.base = harness.make_base_dir(Path(tempfile.mkdtemp(prefix=f"p3s_gpu_{name}_")), models_dir=args.models)
        self.srv = harness.ComfyServer(base=self.base, port=harness.free_port())
        log_dir = log_dir or (Path(args.log_dir) if args.log_dir else self.base)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.srv.log_path = log_dir / f"server-{name}.log"
        self.cmd = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(self.srv.port),
                    "--disable-auto-launch", "--base-directory", str(self.base),
                    "--database-url", "sqlite:///:memory:",
                    *([] if mode == "dynamic" else ["--disable-dynamic-vram"]),
                    *(["--fp16-unet"] if args.unet_dtype == "fp16" else []), *args.server_arg, *extra]
        self.mon = None
        self.seed = 1000

    def start(self, timeout: float = 300) -> float:
        t0 = time.perf_counter()
        if hasattr(harness, "popen_server"):  # own process group, dies with this script, stale ones reaped
            self.srv.proc = harness.popen_server(self.cmd, self.srv.log_path)
        else:
            with open(self.srv.log_path, "wb") as log:
                self.srv.proc = subprocess.Popen(self.cmd, cwd=harness.comfyui_dir(), stdout=log,
                                                 stderr=subprocess.STDOUT, start_new_session=True,
                                                 env=dict(os.environ, PYTHONUNBUFFERED="1"))
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.srv.proc.poll() is not None:
                raise harness.HarnessError(f"ComfyUI exited:\n{self.srv.log()[-4000:]}")
            try:
                self.srv.get("/system_stats", timeout=2)
                self.mon = GpuPeak(self.srv.proc.pid)
                self.mon.start()
                return round(time.perf_counter() - t0, 1)
            except Exception:
                time.sleep(0.25)
        self.stop()
        raise harness.HarnessError("ComfyUI did not start")

    def stop(self):
        if self.mon is not None:
            self.mon.stop()
        self.srv.stop()

    def log(self) -> str:
        return self.srv.log()

    def log_size(self) -> int:
        try:
            return self.srv.log_path.stat().st_size
        except OSError:
            return 0

    def interrupt(self):
        try:
            self.srv.post("/interrupt", {}, timeout=10)
        except Exception:
            pass

    def run(self, prompt: dict, timeout: float) -> dict:
        """Queue one prompt and wait for it (polled every 50 ms). Returns wall and ComfyUI's own
        execution time (its execution_start / execution_success timestamps), peak GPU memory, error."""
        if self.mon is not None:
            self.mon.reset()
        t0 = time.perf_counter()
        err, entry, pid = None, None, None
        try:
            pid = self.srv.queue(prompt)
            deadline = time.time() + timeout
            while True:
                try:
                    hist = self.srv.get(f"/history/{pid}", timeout=30)
                except (TimeoutError, urllib.error.URLError, ConnectionError):
                    hist = {}
                status = hist.get(pid, {}).get("status", {})
                if status.get("completed") is not None and status.get("status_str") in ("success", "error"):
                    entry = hist[pid]
                    break
                if self.srv.proc.poll() is not None:
                    raise harness.HarnessError(f"ComfyUI died:\n{self.log()[-3000:]}")
                if time.time() > deadline:
                    self.interrupt()
                    raise harness.HarnessError(f"did not finish within {timeout:.0f} s (interrupted)")
                time.sleep(0.05)
            if entry["status"]["status_str"] != "success":
                err = "prompt failed: " + json.dumps(entry["status"].get("messages", []))[-1500:]
        except harness.HarnessError as e:
            err = str(e)[-1500:]
        wall = time.perf_counter() - t0
        stamps = {}
        for event, data in (entry or {}).get("status", {}).get("messages", []):
            if isinstance(data, dict) and "timestamp" in data:
                stamps[event] = data["timestamp"]
        end = stamps.get("execution_success", stamps.get("execution_error"))
        exec_s = (end - stamps["execution_start"]) / 1000 if end and "execution_start" in stamps else None
        files = self.srv.output_files(entry) if entry else []
        return {"wall_s": round(wall, 3), "exec_s": exec_s, "error": err,
                "peak_gpu_mib": self.mon.peak if self.mon else None,
                "card_peak_mib": self.mon.card_peak if self.mon else None,
                "files": [str(f) for f in files]}

    def next_seed(self) -> int:
        self.seed += 1
        return self.seed


def log_facts(text: str) -> dict:
    text = ANSI.sub("", text)

    def first(pattern):
        m = re.search(pattern, text)
        return m.group(1).strip() if m else None

    return {"dynamic_vram_enabled": "DynamicVRAM support detected and enabled" in text,
            "device": first(r"Device: (.+)"), "total_vram": first(r"Total VRAM (\d+ MB)"),
            "pytorch": first(r"pytorch version: (\S+)"), "comfyui": first(r"ComfyUI version: (\S+)"),
            "unet_dtype": first(r"model weight dtype ([^\n]+)"),
            "dynamic_prepares": len(re.findall(r"prepared for dynamic VRAM loading", text)),
            "partial_loads": len(re.findall(r"loaded partially", text)),
            "tracebacks": text.count("Traceback (most recent call last)"),
            "two_device_errors": len(re.findall(r"Expected all tensors to be on the same device", text))}


# --- prompts --------------------------------------------------------------------------------------
def train_prompt(args, save_name: str, epochs: int, images: int) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": args.checkpoint}},
        "cv": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": args.clip_vision}},
        "img": {"class_type": "EmptyImage", "inputs": {"width": args.size, "height": args.size,
                                                       "batch_size": images, "color": 0x996633}},
        "train": {"class_type": "P3STrainer", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "clip_vision": ["cv", 0],
            "images": ["img", 0], "prompt": "a photo of sks dog", "identifier": "sks",
            "epochs": epochs, "learning_rate": 1e-5, "gamma": 0.1, "resolution": args.size,
            "seed": 0, "save_name": save_name, "save_every": 0,
            "gradient_checkpointing": args.checkpointing}},
        "out": {"class_type": "PreviewImage", "inputs": {"images": ["train", 2]}},
    }


def sample_prompt(args, variant: str, steps: int, seed: int, adapter_file: str) -> dict:
    """One variant's KSampler run. Node ids are the same in every variant (and as in training), so
    ComfyUI's cache serves everything but the KSampler and SaveLatent once a variant has run."""
    p3s, cnet = variant.startswith("p3s"), variant.endswith("controlnet")
    g = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": args.checkpoint}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a photo of sks dog on a beach"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "lat": {"class_type": "EmptyLatentImage", "inputs": {"width": args.size, "height": args.size, "batch_size": 1}},
        "ks": {"class_type": "KSampler", "inputs": {
            "model": ["inj", 0] if p3s else ["ckpt", 0], "seed": seed, "steps": steps, "cfg": args.cfg,
            "sampler_name": args.sampler, "scheduler": args.scheduler,
            "positive": ["cn", 0] if cnet else ["pos", 0], "negative": ["cn", 1] if cnet else ["neg", 0],
            "latent_image": ["lat", 0], "denoise": 1.0}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["ks", 0], "filename_prefix": f"gpu_check/{variant}"}},
    }
    if p3s:
        g.update({
            "cv": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": args.clip_vision}},
            "ad": {"class_type": "P3SAdapterLoader", "inputs": {"adapter_name": adapter_file}},
            "ref": {"class_type": "EmptyImage", "inputs": {"width": args.size, "height": args.size,
                                                           "batch_size": 1, "color": 0x996633}},
            "inj": {"class_type": "P3SConditionInjector", "inputs": {
                "model": ["ckpt", 0], "adapter": ["ad", 0], "reference": ["ref", 0], "vae": ["ckpt", 2],
                "clip_vision": ["cv", 0], "lam": 0.2, "strength": 1.0, "apply_to": "cond and uncond"}}})
    if cnet:
        g.update({
            "cnl": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": args.controlnet}},
            "cnimg": {"class_type": "EmptyImage", "inputs": {"width": args.size, "height": args.size,
                                                             "batch_size": 1, "color": 0x808080}},
            "cn": {"class_type": "ControlNetApplyAdvanced", "inputs": {
                "positive": ["pos", 0], "negative": ["neg", 0], "control_net": ["cnl", 0], "image": ["cnimg", 0],
                "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0, "vae": ["ckpt", 2]}}})
    return g


# --- the run --------------------------------------------------------------------------------------
class Clock:
    def __init__(self, budget_s: float):
        self.t0, self.budget = time.perf_counter(), budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return math.inf if not self.budget else self.budget - self.elapsed()


def summary(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "n": len(xs)}


def say(*a):
    print(f"[gpu_check {time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


class Check:
    def __init__(self, args):
        self.args = args
        self.clock = Clock(args.budget_s)
        self.res = {
            "schema": 1, "kind": "gpu_check", "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": recorded_command(sys.argv[1:]),
            "settings": {"size": args.size, "steps": args.steps, "short_steps": args.short_steps, "cfg": args.cfg,
                         "sampler": args.sampler, "scheduler": args.scheduler, "unet_dtype": args.unet_dtype,
                         "rounds": args.rounds, "min_rounds": args.min_rounds, "epochs": args.epochs,
                         "images": args.images, "gradient_checkpointing": args.checkpointing,
                         "server_args": args.server_arg, "budget_s": args.budget_s,
                         "variants": list(VARIANTS),
                         "p3s": "P3S Condition Injector, lam 0.2, strength 1, cond and uncond, reference 512^2",
                         "controlnet": "ControlNetApplyAdvanced, strength 1.0, start 0, end 1 (every step), "
                                       "random-weight SD1.5 ControlNet"},
            "goals": dict(GOALS), "card_total_mib": card_total_mib(),
            "train": None, "sampling": {}, "lowvram": [], "cuts": [], "servers": {}}
        self.adapter = None          # file name in models/p3s of the adapter the P3S variants use
        self.adapter_path = None     # its path (copied into later servers' models/p3s)
        self.reference_latent = {}   # (mode) -> (seed, latent path) of a full-load P3S 50-step run
        # estimates (s), replaced by measurements as they come
        self.est = {"server": 15.0, "round": 20.0, "warmup": 15.0, "lowvram": 30.0}

    # -- output --
    def write(self):
        self.res["elapsed_s"] = round(self.clock.elapsed(), 1)
        if self.args.out:
            out = Path(self.args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.parent / f".{out.name}.tmp"
            tmp.write_text(json.dumps(self.res, indent=1) + "\n")
            tmp.replace(out)

    def cut(self, what: str):
        say("CUT:", what)
        self.res["cuts"].append(what)
        self.write()

    def server_facts(self, s: Server, start_s):
        facts = log_facts(s.log())
        facts.update({"start_s": start_s, "args": s.cmd[s.cmd.index("sqlite:///:memory:") + 1:],
                      "log": s.srv.log_path.name})
        self.res["servers"][s.name] = facts

    def install_adapter(self, s: Server):
        if self.adapter_path and Path(self.adapter_path).exists():
            dest = s.base / "models" / "p3s" / Path(self.adapter_path).name
            if not dest.exists():
                shutil.copyfile(self.adapter_path, dest)

    def find_adapter(self, s: Server, name: str):
        for f in (s.base / "models" / "p3s").glob(name + "*.safetensors"):
            self.adapter, self.adapter_path = f.name, str(f)
            return True
        return False

    def later_needs(self, after: str) -> float:
        """Seconds the phases after ``after`` need at their minimum (estimates, replaced by what was
        measured as the run goes)."""
        a, e = self.args, self.est
        order = ["train"] + [f"sample:{m}" for m in a.modes] + ["lowvram"]
        need = 0.0
        for phase in order[order.index(after) + 1:]:
            if phase.startswith("sample:"):
                own = phase == f"sample:{a.train_mode}"  # sampling in the training's server: no new start
                need += (0 if own else e["server"]) + e["warmup"] + a.min_rounds * e["round"]
            else:
                need += e["lowvram"] * len(a.lowvram)
        return need

    # -- phases --
    def train(self, s: Server):
        a = self.args
        room = self.clock.left() - self.later_needs("train") - 15
        timeout = min(a.timeout, room)
        name = "p3s_gpu_check"
        say(f"training {a.epochs} epochs x {a.images} images at {a.size}^2 (timeout {timeout:.0f} s)")
        r = s.run(train_prompt(a, name, a.epochs, a.images), timeout) if timeout > 30 else \
            {"error": f"skipped: {room:.0f} s left for it", "wall_s": None, "exec_s": None}
        r.pop("files", None)
        r.update({"mode": s.mode, "epochs": a.epochs, "images": a.images, "size": a.size,
                  "steps": a.epochs * a.images})
        if r.get("peak_gpu_mib"):
            r["peak_gpu_gib"] = round(r["peak_gpu_mib"] / 1024, 2)
        t = r.get("exec_s") or r.get("wall_s")
        r["goals"] = {"le_60s": bool(t is not None and r["error"] is None and t <= GOALS["train_max_s"]),
                      "le_10gb": bool(r.get("peak_gpu_mib") and r["error"] is None
                                      and r["peak_gpu_mib"] <= GOALS["train_max_gib"] * 1024)}
        log = ANSI.sub("", s.log())
        steps = re.findall(r"\[P3S Trainer\] step (\d+)/(\d+)[^\n]*loss ([0-9.eE+-]+|nan|inf)", log)
        if steps:
            r["loss_first_last"] = [float(steps[0][2]), float(steps[-1][2])]
            r["steps_done"] = int(steps[-1][0])
        prec = re.findall(r"\[P3S Trainer\][^\n]*(precision[^\n]*)", log)
        if prec:
            r["precision_line"] = prec[0][:200]
        self.res["train"] = r
        self.write()
        say("training:", json.dumps({k: r.get(k) for k in ("exec_s", "wall_s", "peak_gpu_mib", "error")}))
        if r["error"] is None and self.find_adapter(s, name):
            return
        # an adapter is still needed for the P3S variants: a one-epoch, one-photo one
        self.cut(f"training did not finish ({r['error']}); the P3S variants use a 1-epoch x 1-photo adapter")
        q = s.run(train_prompt(a, name + "_quick", 1, 1), min(a.timeout, 300))
        self.res["train"]["quick_adapter"] = {k: q.get(k) for k in ("exec_s", "wall_s", "error")}
        self.find_adapter(s, name + "_quick")
        self.write()

    def sampling(self, s: Server):
        a, mode = self.args, s.mode
        res = {"mode": mode, "warmup": [], "rounds": [], "variants": {}}
        self.res["sampling"][mode] = res
        if not self.adapter:
            res["error"] = "no adapter (training failed)"
            self.write()
            return
        variants = list(VARIANTS)

        def run(variant, steps, seed=None):
            seed = s.next_seed() if seed is None else seed
            r = s.run(sample_prompt(a, variant, steps, seed, self.adapter), a.timeout)
            r["seed"] = seed
            if r["error"]:
                say(f"{mode} {variant} {steps} steps: ERROR {r['error'][:300]}")
            return r

        t0 = time.perf_counter()
        for v in variants:  # warm-up: first loads, caches, kernels' first calls
            r = run(v, a.warmup_steps)
            res["warmup"].append({"variant": v, **{k: r[k] for k in ("exec_s", "wall_s", "error")}})
        self.est["warmup"] = time.perf_counter() - t0
        self.write()
        failed = {w["variant"] for w in res["warmup"] if w["error"]}
        variants = [v for v in variants if v not in failed]
        if "plain" in failed:
            res["error"] = "plain failed in the warm-up"
            self.write()
            return
        for k in range(a.rounds):
            if k >= a.min_rounds and self.clock.left() - self.later_needs(f"sample:{mode}") < 1.2 * self.est["round"]:
                self.cut(f"{mode}: {k} rounds of {a.rounds} (time)")
                break
            t0 = time.perf_counter()
            rnd = {"round": k, "order": variants if k % 2 == 0 else variants[::-1], "runs": {}}
            for v in rnd["order"]:
                sw = run(v, 1)
                one = run(v, a.short_steps)
                full = run(v, a.steps)
                rnd["runs"][v] = {"switch_s": sw["exec_s"], "short_s": one["exec_s"], "full_s": full["exec_s"],
                                  "full_wall_s": full["wall_s"], "seed": full["seed"],
                                  "peak_gpu_mib": max(x["peak_gpu_mib"] or 0 for x in (sw, one, full)),
                                  "error": sw["error"] or one["error"] or full["error"]}
                if v == "p3s" and not full["error"] and full["files"]:
                    self.reference_latent[mode] = (full["seed"], full["files"][0])
            res["rounds"].append(rnd)
            self.est["round"] = time.perf_counter() - t0
            self.summarize(res)
            self.write()
            say(f"{mode} round {k}: " + ", ".join(
                f"{v} {res['variants'][v]['ratio_to_plain']:.3f}x" for v in variants
                if res["variants"].get(v, {}).get("ratio_to_plain") is not None))

    def summarize(self, res):
        a = self.args
        per_step, prompt = {}, {}
        for rnd in res["rounds"]:
            for v, r in rnd["runs"].items():
                ok = not r["error"] and r["full_s"] is not None and r["short_s"] is not None
                per_step.setdefault(v, []).append((r["full_s"] - r["short_s"]) / (a.steps - a.short_steps) if ok else None)
                prompt.setdefault(v, []).append(r["full_s"] if ok else None)
        plain, plain_prompt = per_step.get("plain", []), prompt.get("plain", [])
        out = {}
        for v in VARIANTS:
            if v not in per_step:
                continue
            ratios = [x / p for x, p in zip(per_step[v], plain) if x is not None and p]
            pratios = [x / p for x, p in zip(prompt[v], plain_prompt) if x is not None and p]
            switch = [rnd["runs"][v]["switch_s"] for rnd in res["rounds"] if v in rnd["runs"]]
            out[v] = {"per_step_s": summary(per_step[v]), "per_step_s_rounds": per_step[v],
                      "ratio_to_plain": statistics.median(ratios) if ratios else None,
                      "ratio_spread": [min(ratios), max(ratios)] if ratios else None, "ratio_rounds": ratios,
                      "prompt_s": summary(prompt[v]), "prompt_ratio_to_plain": statistics.median(pratios) if pratios else None,
                      "prompt_ratio_spread": [min(pratios), max(pratios)] if pratios else None,
                      "switch_s": summary(switch),
                      "errors": sorted({rnd["runs"][v]["error"][:300] for rnd in res["rounds"]
                                        if v in rnd["runs"] and rnd["runs"][v]["error"]})}
        res["variants"] = out
        r = {v: (out.get(v) or {}).get("ratio_to_plain") for v in VARIANTS}
        if r["p3s"] is not None:
            res["goals"] = {"p3s_le_1.25": r["p3s"] <= GOALS["p3s_max_ratio"],
                            "p3s_below_controlnet": r["controlnet"] is not None and r["p3s"] < r["controlnet"],
                            # every round, not only the median
                            "p3s_le_1.25_every_round": max(out["p3s"]["ratio_rounds"]) <= GOALS["p3s_max_ratio"]}

    def lowvram(self, mode: str, left_gib: float):
        a = self.args
        total = self.res["card_total_mib"]
        reserve = max(0.0, round(total / 1024 - left_gib, 2)) if total else 0.0
        name = f"lowvram-{mode}-{left_gib:g}"
        row = {"mode": mode, "left_gib": left_gib, "reserve_vram_gib": reserve, "card_total_mib": total,
               "variant": "p3s", "steps": a.steps}
        self.res["lowvram"].append(row)
        # its own log first; appended to server-lowvram.log afterwards (one file for all such runs)
        s = Server(name, mode, a, ["--reserve-vram", str(reserve)], log_dir=Path(tempfile.mkdtemp(prefix="p3s_lv_")))
        try:
            row["start_s"] = s.start()
            self.install_adapter(s)
            ref_mode = next((m for m in (mode, "legacy", "dynamic") if m in self.reference_latent), None)
            seed = self.reference_latent[ref_mode][0] if ref_mode else 4242
            mark = s.log_size()
            r = s.run(sample_prompt(a, "p3s", a.steps, seed, self.adapter), min(a.timeout, max(60.0, self.clock.left() - 10)))
            row.update({k: r[k] for k in ("exec_s", "wall_s", "error", "peak_gpu_mib", "card_peak_mib")})
            row["seed"] = seed
            row["completed"] = r["error"] is None
            log = s.log()
            new_lines = ANSI.sub("", log.encode()[mark:].decode(errors="replace")).splitlines()
            row["load_lines"] = [ln.strip()[:300] for ln in new_lines if LOAD_LINE.search(ln)][:60]
            row["partial_loads"] = sum("loaded partially" in ln for ln in row["load_lines"])
            if r["error"] is None and r["files"] and ref_mode:
                row["vs_full_load"] = compare_latents(self.reference_latent[ref_mode][1], r["files"][0])
                row["vs_full_load"]["reference"] = f"{ref_mode} sampling, + P3S, same seed, full load"
        except harness.HarnessError as e:
            row.update({"completed": False, "error": str(e)[-1500:]})
        finally:
            s.stop()
            self.server_facts(s, row.get("start_s"))
            if a.log_dir:
                with open(Path(a.log_dir) / "server-lowvram.log", "a", errors="replace") as f:
                    f.write(f"\n===== {name}: {' '.join(s.cmd[1:])}\n{s.log()}")
                self.res["servers"][name]["log"] = "server-lowvram.log"
        self.write()
        say(f"{name}: completed {row.get('completed')}, {row.get('exec_s')} s, partial loads {row.get('partial_loads')}")

    def main(self) -> int:
        try:
            return self._main()
        except KeyboardInterrupt:  # the caller's time limit (timeout -s INT): keep what was measured
            self.cut(f"interrupted at {self.clock.elapsed():.0f} s")
            self.res["summary"] = overall(self.res)
            self.write()
            return 130

    def _main(self) -> int:
        a = self.args
        modes = a.modes
        train_done = a.train_mode == "none"
        if train_done:
            self.res["train"] = {"skipped": "--train-mode none"}
        for mode in modes:
            need = self.est["server"] + self.est["warmup"] + a.min_rounds * self.est["round"]
            if self.adapter and self.clock.left() < need:
                self.cut(f"{mode} sampling skipped (time: {self.clock.left():.0f} s left, {need:.0f} s needed)")
                continue
            s = Server(mode, mode, a, [])
            start_s = None
            try:
                start_s = s.start()
                self.est["server"] = start_s + 3
                self.install_adapter(s)
                if not train_done and a.train_mode == mode:
                    self.train(s)
                    train_done = True
                self.sampling(s)
            except harness.HarnessError as e:
                self.res["sampling"].setdefault(mode, {"mode": mode})["error"] = str(e)[-1500:]
            finally:
                s.stop()
                self.server_facts(s, start_s)
                self.write()
        for spec in a.lowvram:
            mode, gib = spec
            if self.clock.left() < self.est["lowvram"]:
                self.cut(f"low-VRAM run {mode}:{gib:g} skipped (time: {self.clock.left():.0f} s left)")
                continue
            t0 = time.perf_counter()
            self.lowvram(mode, gib)
            self.est["lowvram"] = max(self.est["lowvram"] * 0.5, time.perf_counter() - t0 + 5)
        self.res["summary"] = overall(self.res)
        self.write()
        print(json.dumps(self.res["summary"], indent=1))
        ok = self.res["summary"]["all_ran"]
        return 0 if ok else 1


def recorded_command(argv: list[str]) -> str:
    """The command line as recorded: without --out / --log-dir (where this run wrote) and with the
    front end's folder named EMPTY_DIR (machine paths say nothing about the measurement)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--out", "--log-dir"):
            skip = True
            continue
        if a.startswith(("--out=", "--log-dir=")):
            continue
        out.append(re.sub(r"--front-end-root=\S+", "--front-end-root=EMPTY_DIR", a))
    return " ".join(["scripts/gpu_check.py", *out])


def compare_latents(a_path: str, b_path: str) -> dict:
    """How far the low-VRAM run's latent is from the full-load run's (same seed, same prompt)."""
    try:
        from safetensors.torch import load_file

        a = load_file(a_path)["latent_tensor"].float()
        b = load_file(b_path)["latent_tensor"].float()
        d = (a - b).abs()
        return {"max_abs_diff": float(d.max()), "max_abs": float(a.abs().max()),
                "rel_rms": float((a - b).norm() / a.norm().clamp_min(1e-12)),
                "finite": bool(b.isfinite().all())}
    except Exception as e:  # no torch here, or another format: say so
        return {"error": f"{type(e).__name__}: {e}"[:300]}


def overall(res: dict) -> dict:
    out = {"sampling": {}, "train": None, "lowvram": []}
    for mode, r in res["sampling"].items():
        v = r.get("variants", {})
        out["sampling"][mode] = {k: {"ratio": (v.get(k) or {}).get("ratio_to_plain"),
                                     "spread": (v.get(k) or {}).get("ratio_spread"),
                                     "per_step_ms": round(1000 * v[k]["per_step_s"]["median"], 2)
                                     if (v.get(k) or {}).get("per_step_s") else None} for k in VARIANTS}
        out["sampling"][mode]["rounds"] = len(r.get("rounds", []))
        out["sampling"][mode]["goals"] = r.get("goals")
    t = res.get("train") or {}
    if "exec_s" in t:
        out["train"] = {k: t.get(k) for k in ("exec_s", "wall_s", "peak_gpu_mib", "error", "goals")}
    for row in res["lowvram"]:
        out["lowvram"].append({k: row.get(k) for k in ("mode", "left_gib", "reserve_vram_gib", "completed",
                                                       "exec_s", "partial_loads", "error")})
    out["all_ran"] = bool(
        all(not r.get("error") and len(r.get("rounds", [])) > 0 for r in res["sampling"].values())
        and res["sampling"] and (not t or t.get("skipped") or t.get("error") is None)
        and all(row.get("completed") for row in res["lowvram"]))
    return out


def parse_lowvram(text: str):
    out = []
    for item in [x.strip() for x in text.split(",") if x.strip()]:
        mode, _, gib = item.partition(":")
        if mode not in MODES or not gib:
            raise SystemExit(f"--lowvram: {item!r}: expected MODE:GIB with MODE in {MODES}")
        out.append((mode, float(gib)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="the JSON to write (rewritten after each phase)")
    ap.add_argument("--log-dir", default=None, help="where the server logs go (default: each server's base folder)")
    ap.add_argument("--modes", default="dynamic,legacy",
                    help="VRAM modes for sampling, in order: dynamic (ComfyUI's default), legacy (--disable-dynamic-vram)")
    ap.add_argument("--train-mode", default="dynamic", choices=[*MODES, "none"],
                    help="the server that trains (once, before its sampling); none: --adapter is used")
    ap.add_argument("--adapter", default=None, help="with --train-mode none: an adapter file for the P3S variants")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--images", type=int, default=5)
    ap.add_argument("--checkpointing", default="auto", help="the Trainer's gradient_checkpointing (auto = on on a GPU)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--short-steps", type=int, default=1, help="the short run subtracted to get the per-step cost")
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--scheduler", default="normal")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-rounds", type=int, default=2)
    ap.add_argument("--unet-dtype", default="fp16", choices=["fp16", "default"],
                    help="fp16: the servers get --fp16-unet; default: ComfyUI picks")
    ap.add_argument("--lowvram", default="legacy:4,dynamic:4,legacy:2",
                    help="low-VRAM runs MODE:GIB (GIB left for models: --reserve-vram = card total - GIB); '' for none")
    ap.add_argument("--models", type=Path, default=None, help="a ComfyUI models folder (default: the random-weight ones)")
    ap.add_argument("--checkpoint", default="p3s_random_sd15.safetensors")
    ap.add_argument("--clip-vision", default="p3s_random_clip_vit_l14.safetensors")
    ap.add_argument("--controlnet", default="p3s_random_controlnet_sd15.safetensors")
    ap.add_argument("--server-arg", action="append", default=[], help="extra ComfyUI argument (repeatable)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per prompt at most")
    ap.add_argument("--budget-s", type=float, default=0, help="fit the whole run in this many seconds (0: no limit)")
    args = ap.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        ap.error(f"--modes: unknown {bad}")
    args.lowvram = parse_lowvram(args.lowvram)
    if args.train_mode != "none" and args.train_mode not in args.modes:
        ap.error("--train-mode must be one of --modes (the training runs in that mode's server)")
    check = Check(args)
    if args.train_mode == "none":
        if not args.adapter:
            ap.error("--train-mode none needs --adapter")
        check.adapter, check.adapter_path = Path(args.adapter).name, str(Path(args.adapter).resolve())
    return check.main()


if __name__ == "__main__":
    sys.exit(main())
