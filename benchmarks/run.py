"""One benchmark run: per-step sampling ratios, RNGR mask time, pack import time.

Every figure that is compared is measured in this one run, interleaved, at the same size and seed,
and reported as a ratio to plain SD1.5 (these machines are shared and noisy). Random weights of the
exact SD1.5 / CLIP ViT-L/14 / ControlNet shapes, so the arithmetic is the real one.

    scripts/bench.sh                       # CPU, 256x256, writes benchmarks/results/
    scripts/bench.sh --device cuda --size 512
"""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import harness  # noqa: E402

VARIANTS = ["plain", "p3s", "controlnet", "p3s+controlnet", "p3s weight 0",
            "p3s region (left half)", "p3s 2 regions (left + right)"]  # regions: issue 16


def summary(xs):
    xs = sorted(xs)
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "n": len(xs)}


def bench_steps(nodes, pack, args):
    import torch

    core = lambda m: importlib.import_module(f"{pack.__name__}.p3s_core.{m}")  # noqa: E731
    node = nodes.NODE_CLASS_MAPPINGS
    with torch.inference_mode():
        model, clip, vae = node["CheckpointLoaderSimple"]().load_checkpoint("p3s_random_sd15.safetensors")[:3]
        clipv = node["CLIPVisionLoader"]().load_clip("p3s_random_clip_vit_l14.safetensors")[0]
        cn = node["ControlNetLoader"]().load_controlnet("p3s_random_controlnet_sd15.safetensors")[0]
        pos = node["CLIPTextEncode"]().encode(clip, "a photo of sks dog")[0]
        neg = node["CLIPTextEncode"]().encode(clip, "")[0]
        hint = torch.zeros(1, args.size, args.size, 3)
        hint[:, args.size // 4: 3 * args.size // 4, args.size // 4: 3 * args.size // 4] = 1.0
        cpos, cneg = node["ControlNetApplyAdvanced"]().apply_controlnet(pos, neg, cn, hint, 1.0, 0.0, 1.0, vae=vae)[:2]
    with torch.inference_mode(False):
        sd = {k: v.detach().clone() for k, v in core("comfy_backend").base_unet_state_dict(model).items()}
        adapter = core("adapter").new_adapter(core("copy_unet").CopyUNetConfig.sd15(), sd, seed=0)
        del sd
        with torch.no_grad():
            for conv in adapter.copy.zero_convs.values():
                conv.weight.normal_(0, 0.01)
    adapter = adapter.eval().requires_grad_(False)
    ref = torch.rand(1, args.size, args.size, 3)
    inj = node["P3SConditionInjector"]()
    with torch.inference_mode():
        p3s = inj.inject(model, adapter, ref, vae, clipv, 0.2, 1.0, "cond and uncond")[0]
        p3s0 = inj.inject(model, adapter, ref, vae, clipv, 0.2, 0.0, "cond and uncond")[0]
        left = torch.zeros(1, args.size, args.size)
        left[:, :, : args.size // 2] = 1.0
        reg1 = inj.inject(model, adapter, ref, vae, clipv, 0.2, 1.0, "cond and uncond", region=left)[0]
        reg2 = inj.inject(reg1, adapter, ref.flip(2), vae, clipv, 0.2, 1.0, "cond and uncond", region=1.0 - left)[0]
    setups = {"plain": (model, pos, neg), "p3s": (p3s, pos, neg), "controlnet": (model, cpos, cneg),
              "p3s+controlnet": (p3s, cpos, cneg), "p3s weight 0": (p3s0, pos, neg),
              "p3s region (left half)": (reg1, pos, neg), "p3s 2 regions (left + right)": (reg2, pos, neg)}
    latent = node["EmptyLatentImage"]().generate(args.size, args.size, 1)[0]
    sampler = node["KSampler"]()

    def run(name, steps):
        m, p, n = setups[name]
        t0 = time.perf_counter()
        with torch.inference_mode():
            sampler.sample(m, 1, steps, 7.5, "ddim", "normal", p, n, latent, denoise=1.0)
        return time.perf_counter() - t0

    for name in VARIANTS:  # warm-up: loads, allocations
        run(name, 1)
    times = {name: [] for name in VARIANTS}
    for rep in range(args.reps):
        for name in (VARIANTS if rep % 2 == 0 else VARIANTS[::-1]):  # interleaved
            # per-step time: the reference encoding happens in the injector node, outside sampling,
            # so a warm KSampler run of N steps is N UNet (+ copy) evaluations and a little overhead
            times[name].append(run(name, args.steps) / args.steps)
    plain = statistics.median(times["plain"])
    out = {}
    for name in VARIANTS:
        s = summary(times[name])
        s["ratio_to_plain"] = s["median"] / plain
        s["ratio_spread"] = [min(times[name]) / plain, max(times[name]) / plain]
        out[name] = s
    return out


def bench_rngr(pack, args):
    import numpy as np

    rngr = importlib.import_module(f"{pack.__name__}.p3s_core.rngr")
    points = importlib.import_module(f"{pack.__name__}.p3s_core.points")
    rng = np.random.default_rng(0)
    img = rng.random((512, 512, 3)).astype(np.float32)
    tokens = rng.standard_normal((257, 1024)).astype(np.float32)
    _, box = rngr.letterbox(img, size=224)
    pts = points.ImagePoints(positive=[(200.0, 220.0)], negative=[(400.0, 300.0)])
    times, letterbox_times = [], []
    for _ in range(args.reps * 4):
        t0 = time.perf_counter()
        rngr.letterbox(img, size=224)
        letterbox_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        rngr.rngr_mask(tokens, box, pts, (512, 512), sigma=0.75, grow=4)
        times.append(time.perf_counter() - t0)
    return {"mask_ms_512": summary([t * 1000 for t in times]),
            "letterbox_ms_512": summary([t * 1000 for t in letterbox_times])}


def bench_import(args):
    """Pack import time as ComfyUI's loader sees it, in a fresh interpreter each time."""
    code = f"""
import sys, asyncio, time
sys.path.insert(0, {str(harness.comfyui_dir())!r})
import comfy.cli_args; comfy.cli_args.args.cpu = True
import folder_paths, utils.extra_config, nodes
t0 = time.perf_counter(); ok = asyncio.run(nodes.load_custom_node({str(REPO)!r})); print(time.perf_counter() - t0, ok)
"""
    times = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stdout.split()
        times.append(float(out[-2]))
    return {"seconds": summary(times)}


def bench_train(args):
    """benchmarks/bench_train.py in its own process (its peak memory is the process's), with and
    without gradient checkpointing; the last JSON line of each configuration is kept."""
    rows = []
    res = args.train_resolution or (512 if args.device == "cuda" else 64)
    for ckpt in ("off", "on"):
        cmd = [sys.executable, str(REPO / "benchmarks" / "bench_train.py"), "--resolution", str(res),
               "--steps", str(args.train_steps), "--checkpointing", ckpt] + (["--cpu"] if args.device == "cpu" else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            rows.append({"gradient_checkpointing": ckpt == "on", "error": proc.stderr[-500:]})
            continue
        row = json.loads(lines[-1])
        row["epoch_s_5_images"] = row["step_s"] * 5  # one epoch = one step per photo (batch 1)
        rows.append(row)
    return rows


def write_report(result, out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2))
    lines = [f"# P3S benchmark ({result['machine']}, {result['device']}, {result['size']}², "
             f"{result['steps']} steps x {result['reps']} reps)", "",
             "| variant | s/step (median) | ratio to plain | ratio spread |", "|---|---|---|---|"]
    for name, s in result["steps_per_variant"].items():
        lines.append(f"| {name} | {s['median']:.3f} | {s['ratio_to_plain']:.3f} | "
                     f"{s['ratio_spread'][0]:.2f}–{s['ratio_spread'][1]:.2f} |")
    r = result["rngr"]
    lines += ["", f"RNGR mask beyond the CLIP forward, 512²: {r['mask_ms_512']['median']:.1f} ms "
              f"(+ letterbox {r['letterbox_ms_512']['median']:.1f} ms)",
              f"Pack import (ComfyUI's loader, fresh process): {result['import']['seconds']['median']:.3f} s"]
    lines += ["", "| training (64² CPU / 512² CUDA) | s/step | s/epoch (5 photos) | peak RSS MiB | peak CUDA MiB |",
              "|---|---|---|---|---|"]
    for row in result.get("train", []):
        if "error" in row:
            lines.append(f"| checkpointing {row['gradient_checkpointing']} | failed | | | |")
            continue
        lines.append(f"| {row['resolution']}², checkpointing {row['gradient_checkpointing']} | {row['step_s']:.2f} | "
                     f"{row['epoch_s_5_images']:.1f} | {row.get('peak_rss_mib', '')} | {row.get('peak_cuda_mib', '-')} |")
    (out_dir / "bench.md").write_text("\n".join(lines) + "\n")
    try:
        from PIL import Image, ImageDraw

        img = Image.new("RGB", (520, 40 + 40 * len(VARIANTS)), "white")
        d = ImageDraw.Draw(img)
        d.text((10, 8), "per-step time, ratio to plain SD1.5", fill="black")
        top = max(s["ratio_to_plain"] for s in result["steps_per_variant"].values())
        for i, (name, s) in enumerate(result["steps_per_variant"].items()):
            y = 36 + 40 * i
            w = int(300 * s["ratio_to_plain"] / max(top, 1e-9))
            d.rectangle([150, y, 150 + w, y + 24], fill=(80, 130, 200))
            d.text((10, y + 6), name, fill="black")
            d.text((156 + w, y + 6), f"{s['ratio_to_plain']:.2f}x", fill="black")
        img.save(out_dir / "bench.png")
    except Exception as e:  # the chart is a convenience; the JSON and Markdown are the report
        print(f"chart not written: {e}", file=sys.stderr)
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--train-steps", type=int, default=3, help="timed training steps (the first is a warm-up)")
    ap.add_argument("--train-resolution", type=int, default=0, help="default: 64 on the CPU, 512 on CUDA")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    base = harness.make_base_dir(Path(tempfile.mkdtemp(prefix="p3s_bench_")))
    nodes, pack = harness.boot_in_process(base, cpu=args.device == "cpu")
    t0 = time.time()
    result = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}",
              "device": args.device, "size": args.size, "steps": args.steps, "reps": args.reps,
              "import": bench_import(args), "rngr": bench_rngr(pack, args),
              "steps_per_variant": bench_steps(nodes, pack, args)}
    if not args.skip_train:
        import gc

        import comfy.model_management as mm

        mm.unload_all_models()  # the training process needs the memory
        gc.collect()
        result["train"] = bench_train(args)
    result["wall_seconds"] = time.time() - t0
    print(write_report(result, args.out))
    print(f"\nwritten: {args.out}/bench.json, bench.md, bench.png ({result['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
