"""P3S Trainer benchmark: time per training step (forward / backward / optimiser) and peak memory.

    # real ComfyUI + the random SD1.5 / CLIP ViT-L (paths from scripts/setup.sh, as scripts/test.sh exports them)
    eval "$(bash scripts/setup.sh | sed 's/^/export /')"
    $P3S_VENV/bin/python benchmarks/bench_train.py --resolution 64 --steps 3
    $P3S_VENV/bin/python benchmarks/bench_train.py --resolution 512 --steps 5 --checkpointing both
    $P3S_VENV/bin/python benchmarks/bench_train.py --resolution 64 --epoch-images 5   # + one measured epoch
    # tiny plain-torch models (no ComfyUI, seconds)
    $P3S_VENV/bin/python benchmarks/bench_train.py --tiny --steps 20
    # the README's peak-RSS figures: one configuration per process, each to its result file
    $P3S_VENV/bin/python benchmarks/bench_train.py --resolution 256 --checkpointing on \
        --out benchmarks/results/train_memory_256_on.json

Memory: CUDA -> ``torch.cuda.max_memory_allocated`` (reset per configuration); CPU -> the process's
peak resident set (``resource.getrusage`` maxrss, which only grows: run one configuration per
process for exact CPU numbers), with the resident set just before the frozen UNet is made
(ComfyUI, SD1.5, CLIP ViT-L and the cached inputs) and the MiB of the frozen UNet that are not
shared with the MODEL's weights. One JSON line per configuration is printed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _maxrss_mib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2**20


def _rss_mib() -> float | None:
    """The current resident set (Linux /proc), None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _unet_own_mib(unet, model) -> float:
    """MiB of the frozen UNet's tensors that are not the MODEL's own memory (shared weights: 0)."""
    src = {t.data_ptr() for t in list(model.model.diffusion_model.parameters())
           + list(model.model.diffusion_model.buffers())}
    own = [t for t in list(unet.parameters()) + list(unet.buffers()) if t.data_ptr() not in src]
    return sum(t.numel() * t.element_size() for t in own) / 2**20


def _timed_steps(adapter, batches, step_fn, steps, lr, gamma, device, train):
    """The training step exactly as p3s_core.train runs it, with a timer around each phase."""
    import torch

    params = list(adapter.parameters())
    for p in params:
        p.requires_grad_(True)
    adapter.train()
    opt = train.make_optimizer(params, train.TrainSettings(lr=lr))
    gen = torch.Generator().manual_seed(0)
    rows = []

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode(False), torch.enable_grad():
        for i in range(steps):
            b = batches[i % len(batches)]
            sync()
            t0 = time.perf_counter()
            l_ldm, l_ac = step_fn(adapter, b.latent.to(device), b.context.to(device),
                                  b.clip_hidden.to(device), gen)
            loss = l_ldm + gamma * l_ac  # Eq. 15
            sync()
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            sync()
            t2 = time.perf_counter()
            opt.step()
            sync()
            t3 = time.perf_counter()
            rows.append({"forward_s": t1 - t0, "backward_s": t2 - t1, "optimizer_s": t3 - t2,
                         "step_s": t3 - t0, "loss": float(loss.detach())})
    adapter.eval().requires_grad_(False)
    return rows


def _timed_epoch(adapter, batches, step_fn, args, device, train):
    """One epoch over ``len(batches)`` photos, measured (not a step time multiplied): the Trainer's
    own loop (``train.train_adapter``) runs two epochs; the second, warm one is timed from the
    optimiser step that ends the first to the one that ends the second."""
    import torch

    stamps = []

    def on_step(step, total, loss):
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    settings = train.TrainSettings(epochs=2, lr=1e-5, resolution=args.resolution)
    train.train_adapter(adapter, batches, step_fn, settings, on_step=on_step, device=device)
    n = len(batches)
    return {"epoch_images": n, "epoch_s": round(stamps[2 * n - 1] - stamps[n - 1], 3)}


def _summary(rows, warmup):
    use = rows[warmup:] or rows
    return {k: round(statistics.median(r[k] for r in use), 4)
            for k in ("forward_s", "backward_s", "optimizer_s", "step_s")}


def bench_tiny(args):
    import torch

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests" / "unit"))
    import test_train as tt  # the unit tests' tiny model

    base, adapter = tt.TinyBase(), tt._adapter()
    from p3s_core import train

    rows = _timed_steps(adapter, tt._batches(2), base.step_fn, args.steps, 1e-3, 0.1,
                        torch.device("cpu"), train)
    return [{"mode": "tiny", "steps": args.steps, **_summary(rows, 1),
             "peak_rss_mib": round(_maxrss_mib(), 1)}]


def bench_comfy(args):
    import torch

    sys.path.insert(0, str(REPO / "scripts"))
    import harness

    base = harness.make_base_dir(Path(tempfile.mkdtemp(prefix="p3s_bench_")))
    nodes, pack = harness.boot_in_process(base, cpu=not torch.cuda.is_available() or args.cpu)
    import comfy.model_management as mm

    core = lambda name: __import__(f"{pack.__name__}.p3s_core.{name}", fromlist=["x"])  # noqa: E731
    tr, train = core("comfyui_engine"), core("train")
    with torch.inference_mode():
        model, clip, vae = nodes.NODE_CLASS_MAPPINGS["CheckpointLoaderSimple"]().load_checkpoint(args.checkpoint)[:3]
        clip_vision = nodes.NODE_CLASS_MAPPINGS["CLIPVisionLoader"]().load_clip(args.clip_vision)[0]
    g = torch.Generator().manual_seed(0)
    images = torch.rand(max(2, args.epoch_images), args.resolution, args.resolution, 3, generator=g)
    settings = train.TrainSettings(epochs=1, resolution=args.resolution)
    device = mm.get_torch_device()
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    out = []
    with torch.inference_mode():
        batches = tr.cache_inputs(model, clip, vae, clip_vision, images, "a photo of sks dog",
                                  resolution=args.resolution)
        for ckpt in modes:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            rss_before = _rss_mib()
            t0 = time.perf_counter()
            unet = tr.frozen_unet_copy(model, device)
            unet_own = _unet_own_mib(unet, model)
            adapter = tr.new_training_adapter(unet)
            with torch.inference_mode(False):
                adapter.to(device)
            ctx = tr.build_step_fn(model, adapter, settings, unet=unet, device=device,
                                   gradient_checkpointing=ckpt, precision=args.precision)
            setup_s = time.perf_counter() - t0
            try:
                rows = _timed_steps(adapter, batches, ctx.step_fn, args.steps, 1e-5, 0.1, device, train)
                epoch = _timed_epoch(adapter, batches[:args.epoch_images], ctx.step_fn, args, device, train) \
                    if args.epoch_images else {}
            finally:
                ctx.close()
            row = {"mode": "comfy", "device": str(device), "resolution": args.resolution,
                   "gradient_checkpointing": ckpt, "precision": args.precision, "steps": args.steps,
                   "setup_s": round(setup_s, 2), **_summary(rows, 1), **epoch,
                   "peak_rss_mib": round(_maxrss_mib(), 1),
                   "rss_before_frozen_unet_mib": None if rss_before is None else round(rss_before, 1),
                   "frozen_unet_own_mib": round(unet_own, 1)}
            if device.type == "cuda":
                row["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            out.append(row)
            print(json.dumps(row), flush=True)
            del ctx, unet, adapter
            import gc
            gc.collect()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny plain-torch models, no ComfyUI")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (the first is a warm-up)")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--checkpointing", choices=["off", "on", "both"], default="off")
    ap.add_argument("--precision", choices=["auto", "fp32"], default="auto")
    ap.add_argument("--epoch-images", type=int, default=0,
                    help="also time one real epoch over this many photos (the Trainer's loop; 0 = off)")
    ap.add_argument("--cpu", action="store_true", help="force ComfyUI's --cpu even with a GPU")
    ap.add_argument("--checkpoint", default=os.environ.get("P3S_BENCH_CHECKPOINT", "p3s_random_sd15.safetensors"))
    ap.add_argument("--clip-vision", default=os.environ.get("P3S_BENCH_CLIP_VISION", "p3s_random_clip_vit_l14.safetensors"))
    ap.add_argument("--out", default=None, help="also write the rows as a result file (scripts/results_file.py)")
    args = ap.parse_args(argv)
    rows = bench_tiny(args) if args.tiny else bench_comfy(args)
    for r in rows:
        print(json.dumps(r))
    if args.out:
        sys.path.insert(0, str(REPO / "scripts"))
        import results_file

        results_file.write(args.out, {"kind": "train_memory", "rows": rows},
                           None if argv is None else [sys.argv[0], *argv])


if __name__ == "__main__":
    main()
