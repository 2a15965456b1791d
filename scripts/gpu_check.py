"""GPU check for Dynamic VRAM (issue 11.3) and training memory/time (issue 14.3), for a CUDA machine.

Runs the real ComfyUI server (no ``--cpu``) twice, with Dynamic VRAM (ComfyUI 0.33's default on
NVIDIA) and with ``--disable-dynamic-vram``, and in each: the P3S Trainer (default 60 epochs x 5
images at 512^2, the paper's setting) and then the P3S Condition Injector in a KSampler run at
512^2 with the adapter just trained. Prints one JSON line per run and a table: wall time of each
prompt, the server process's peak GPU memory (nvidia-smi, sampled every 0.2 s: includes the CUDA
context and caching allocator), and from the server log whether Dynamic VRAM was on, how many
models were prepared for dynamic loading, and any error.

    source scripts/env.sh --comfyui ../shared/comfyui/comfyui-0.33.0.tar.gz   # a CUDA torch venv
    $P3S_VENV/bin/python scripts/gpu_check.py                 # both modes, 60 epochs x 5 images
    $P3S_VENV/bin/python scripts/gpu_check.py --epochs 2 --modes dynamic   # a quick smoke run
    $P3S_VENV/bin/python scripts/gpu_check.py --models /path/to/ComfyUI/models  # real weights

Goals (issue 14): training <= 2 min on one H100-class GPU and <= 10 GB peak.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


class GpuPeak(threading.Thread):
    """Samples ``nvidia-smi`` for the used GPU memory of one process tree (MiB) until stopped."""

    def __init__(self, pid: int, period: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.period, self.peak, self.samples = pid, period, 0, 0
        self._stop = threading.Event()

    def reset(self):
        self.peak = 0

    def run(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                     timeout=10).stdout
                used = sum(int(m) for p, m in (line.split(",") for line in out.strip().splitlines() if "," in line)
                           if int(p) == self.pid)
                self.peak = max(self.peak, used)
                self.samples += 1
            except Exception:  # nvidia-smi hiccups: keep sampling
                pass
            self._stop.wait(self.period)

    def stop(self):
        self._stop.set()


def start_server(base: Path, dynamic: bool, extra: list[str]) -> harness.ComfyServer:
    srv = harness.ComfyServer(base=base, port=harness.free_port())
    srv.log_path = base / f"server-{'dynamic' if dynamic else 'legacy'}.log"
    cmd = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(srv.port),
           "--disable-auto-launch", "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
           *([] if dynamic else ["--disable-dynamic-vram"]), *extra]
    srv.proc = harness.popen_server(cmd, srv.log_path)  # own group, dies with this script
    deadline = time.time() + 300
    while time.time() < deadline:
        if srv.proc.poll() is not None:
            raise harness.HarnessError(f"ComfyUI exited:\n{srv.log()[-4000:]}")
        try:
            srv.get("/system_stats", timeout=2)
            return srv
        except Exception:
            time.sleep(0.5)
    srv.stop()
    raise harness.HarnessError("ComfyUI did not start")


def train_prompt(args, save_name: str) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": args.checkpoint}},
        "cv": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": args.clip_vision}},
        "img": {"class_type": "EmptyImage", "inputs": {"width": args.size, "height": args.size,
                                                       "batch_size": args.images, "color": 0x996633}},
        "train": {"class_type": "P3STrainer", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "clip_vision": ["cv", 0],
            "images": ["img", 0], "prompt": "a photo of sks dog", "identifier": "sks",
            "epochs": args.epochs, "learning_rate": 1e-5, "gamma": 0.1, "resolution": args.size,
            "seed": 0, "save_name": save_name, "save_every": 0,
            "gradient_checkpointing": args.checkpointing}},
        "out": {"class_type": "PreviewImage", "inputs": {"images": ["train", 2]}},
    }


def inject_prompt(args, adapter_file: str) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": args.checkpoint}},
        "cv": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": args.clip_vision}},
        "ad": {"class_type": "P3SAdapterLoader", "inputs": {"adapter_name": adapter_file}},
        "ref": {"class_type": "EmptyImage", "inputs": {"width": args.size, "height": args.size,
                                                       "batch_size": 1, "color": 0x996633}},
        "inj": {"class_type": "P3SConditionInjector", "inputs": {
            "model": ["ckpt", 0], "adapter": ["ad", 0], "reference": ["ref", 0], "vae": ["ckpt", 2],
            "clip_vision": ["cv", 0], "lam": 0.2, "strength": 1.0, "apply_to": "cond and uncond"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a photo of sks dog on a beach"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "lat": {"class_type": "EmptyLatentImage", "inputs": {"width": args.size, "height": args.size, "batch_size": 1}},
        "ks": {"class_type": "KSampler", "inputs": {
            "model": ["inj", 0], "seed": 0, "steps": args.sample_steps, "cfg": 7.5, "sampler_name": "ddim",
            "scheduler": "normal", "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["lat", 0],
            "denoise": 1.0}},
        "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["ks", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["dec", 0], "filename_prefix": "p3s_gpu_check"}},
    }


def timed(srv: harness.ComfyServer, mon: GpuPeak, prompt: dict, timeout: float) -> dict:
    mon.reset()
    t0 = time.perf_counter()
    try:
        srv.run(prompt, timeout=timeout)
        err = None
    except harness.HarnessError as e:
        err = str(e)[-800:]
    return {"wall_s": round(time.perf_counter() - t0, 1), "peak_gpu_mib": mon.peak, "error": err}


def log_facts(text: str) -> dict:
    return {"dynamic_vram_enabled": "DynamicVRAM support detected and enabled" in text,
            "dynamic_prepares": len(re.findall(r"prepared for dynamic VRAM loading", text)),
            "lowvram_loads": len(re.findall(r"loaded partially", text)),
            "tracebacks": text.count("Traceback (most recent call last)")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="dynamic,legacy", help="dynamic (default VRAM mode), legacy (--disable-dynamic-vram)")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--images", type=int, default=5)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                    help="the Trainer's gradient_checkpointing input (default on)")
    ap.add_argument("--models", type=Path, default=None, help="a ComfyUI models folder (default: the random-weight ones)")
    ap.add_argument("--checkpoint", default="p3s_random_sd15.safetensors")
    ap.add_argument("--clip-vision", default="p3s_random_clip_vit_l14.safetensors")
    ap.add_argument("--server-arg", action="append", default=[], help="extra ComfyUI argument (repeatable), e.g. --lowvram")
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args(argv)

    rows = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        base = harness.make_base_dir(Path(tempfile.mkdtemp(prefix=f"p3s_gpu_{mode}_")), models_dir=args.models)
        srv = start_server(base, dynamic=(mode == "dynamic"), extra=args.server_arg)
        mon = GpuPeak(srv.proc.pid)
        mon.start()
        try:
            name = f"p3s_gpu_check_{mode}"
            train = timed(srv, mon, train_prompt(args, name), args.timeout)
            inject = timed(srv, mon, inject_prompt(args, name + ".safetensors"), args.timeout) \
                if train["error"] is None else {"skipped": "training failed"}
        finally:
            mon.stop()
            srv.stop()
        row = {"mode": mode, "epochs": args.epochs, "images": args.images, "size": args.size,
               "gradient_checkpointing": args.checkpointing, "train": train, "inject": inject,
               **log_facts(srv.log()), "log": str(srv.log_path)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| mode | train s | train peak GPU MiB | inject s | inject peak GPU MiB | dynamic on | errors |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        t, i = r["train"], r["inject"]
        print(f"| {r['mode']} | {t['wall_s']} | {t['peak_gpu_mib']} | {i.get('wall_s', '-')} | "
              f"{i.get('peak_gpu_mib', '-')} | {r['dynamic_vram_enabled']} | "
              f"{t['error'] or i.get('error') or i.get('skipped') or 0} |")
    return 0 if all(r["train"]["error"] is None and r["inject"].get("error") is None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
