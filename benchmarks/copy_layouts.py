"""Per-step sampling cost of the two copy layouts (issue 22) against plain SD1.5, and their parameter
counts: the real ComfyUI, in process, PyTorch SDPA attention (``--use-pytorch-cross-attention``), 512^2.

Random SD1.5 weights (the exact shapes), fp32 UNet (ComfyUI's CPU default); one adapter per layout
(:data:`p3s_core.copy_config.COPY_LAYOUTS`), initialised from that UNet, with a random stored
reference, through the Condition Injector's patch (``apply_injector``, default schedule). Each round
runs plain / encoder / full (order reversed every other round) for ``--steps`` DDIM steps (CFG 7.5,
batch 1) after a one-step warm-up; per-step time = run time / steps; the ratio to plain is taken per
round and its median reported (a shared machine drifts; a round is minutes at most). Parameter
counts are of the copies built on the meta device. Run under the machine-wide lock:

    source scripts/env.sh && flock /tmp/p3s-heavy.lock $P3S_VENV/bin/python benchmarks/copy_layouts.py
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
DEFAULT_OUT = REPO / "benchmarks" / "results" / "copy_layouts.json"
VARIANTS = ("plain", "encoder", "full")


def parameter_counts(core) -> dict:
    """Parameters of each layout's copy (and of its zero convs), built on the meta device."""
    import torch

    copy_mod, init_mod = core("copy_unet"), core("copy_init")
    out = {}
    for layout in core("copy_config").COPY_LAYOUTS:
        with torch.device("meta"):
            copy = copy_mod.P3SCopyUNet(copy_mod.CopyUNetConfig.sd15(layout))
        out[layout] = {"copy": init_mod.count_parameters(copy),
                       "zero_convs": sum(p.numel() for p in copy.zero_convs.parameters()),
                       "copy_transformers": len(copy.feature_transformers())}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512, help="image size (latent = size/8)")
    ap.add_argument("--steps", type=int, default=2, help="DDIM steps per timed run")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="JSON file to write")
    args = ap.parse_args(argv)
    import importlib

    import profile_step as prof
    import torch

    t_start = time.time()
    nodes, pack, kernel = prof.boot("sdpa", "cpu")
    import comfyui_version

    core = lambda m: importlib.import_module(f"{pack.__name__}.p3s_core.{m}")  # noqa: E731
    engine, adapter_mod, cfg_mod = core("comfyui_engine"), core("adapter"), core("copy_config")
    node = nodes.NODE_CLASS_MAPPINGS
    model, _clip, _vae, pos, neg = prof.random_sd15(nodes)
    lat = args.size // 8
    g = torch.Generator().manual_seed(args.seed)
    reference = (torch.randn(1, 4, lat, lat, generator=g), torch.randn(1, 257, 1024, generator=g))
    models = {"plain": model}
    with torch.inference_mode(False):
        sd = {k: v.detach().clone().float() for k, v in engine.base_unet_state_dict(model).items()}
        for layout in cfg_mod.COPY_LAYOUTS:
            adapter = adapter_mod.new_adapter(cfg_mod.CopyUNetConfig.sd15(layout), sd, seed=args.seed)
            adapter = adapter.eval().requires_grad_(False)
            models[layout] = engine.apply_injector(model, adapter, None, core("schedule").P3SSchedule(),
                                                   reference=reference)[0]
        del sd
    latent = node["EmptyLatentImage"]().generate(args.size, args.size, 1)[0]

    def run(name, steps):
        t0 = time.perf_counter()
        with torch.inference_mode():
            node["KSampler"]().sample(models[name], args.seed, steps, 7.5, "ddim", "normal", pos, neg, latent,
                                      denoise=1.0)
        return time.perf_counter() - t0

    for name in VARIANTS:  # warm-up: loads, allocations
        run(name, 1)
    times = {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        for name in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            times[name].append(run(name, args.steps) / args.steps)
            print(f"[copy_layouts] round {r}: {name} {times[name][-1]:.2f} s/step", file=sys.stderr, flush=True)
    per_step = {}
    for name in VARIANTS:
        ratios = [t / p for t, p in zip(times[name], times["plain"])]
        per_step[name] = {"median_s": statistics.median(times[name]), "times_s": times[name],
                          "ratio_to_plain": statistics.median(ratios),
                          "ratio_spread": [min(ratios), max(ratios)]}
    import results_file

    result = {**results_file.stamp(None if argv is None else ["benchmarks/copy_layouts.py", *argv]),
              "comfyui": comfyui_version.__version__, "torch": torch.__version__, "device": "cpu",
              "threads": torch.get_num_threads(), "attention": kernel, "size": args.size,
              "latent": [lat, lat], "steps": args.steps, "rounds": args.rounds,
              "setup": "random SD1.5, fp32 UNet; adapters from its UNet; random stored reference; "
                       "ddim / normal, CFG 7.5, batch 1; default P3S schedule (Eq. 10)",
              "per_step": per_step, "parameters": parameter_counts(core),
              "wall_seconds": round(time.time() - t_start, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("per_step", "parameters")}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
