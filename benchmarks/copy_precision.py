"""How far one DDIM step moves when the copy and encoder compute in bf16 or fp16 instead of fp32
(issue 21.2), relative to P3S's own effect on that step. The real ComfyUI, in process, on the CPU.

The random SD1.5 (fp32 UNet, ComfyUI's CPU default), an adapter initialised from its UNet with
random zero convs, self- and cross-attention (N(0, 0.05), as the tests' "trained" adapter) and a random stored reference; the
Condition Injector's patch (``apply_injector``) with the copy forced to fp32, bf16 or fp16
(``copy_precision``), and without P3S. One step of ComfyUI's ``ddim`` sampler (``ddim_uniform``,
50 steps, CFG 7.5, batch 1) through ``KSamplerAdvanced``: the first step (from pure noise) and a
middle one (step 25 of 50, from a noised seeded latent). Reported per step and dtype:
``move = |x_dtype - x_fp32|`` and ``effect = |x_fp32 - x_plain|`` (max and mean over the latent)
and their ratio. Run under the machine-wide lock:

    source scripts/env.sh && flock /tmp/p3s-heavy.lock $P3S_VENV/bin/python benchmarks/copy_precision.py --size 512
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
DEFAULT_OUT = REPO / "benchmarks" / "results" / "copy_precision.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512, help="image size (latent = size/8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="JSON file to write")
    args = ap.parse_args(argv)
    import harness
    import torch

    base = harness.make_base_dir(Path(tempfile.mkdtemp(prefix="p3s_copy_precision_")))
    nodes, pack = harness.boot_in_process(base)
    import importlib

    import comfyui_version

    core = lambda m: importlib.import_module(f"{pack.__name__}.p3s_core.{m}")  # noqa: E731
    engine, adapter_mod, sched_mod = core("comfyui_engine"), core("adapter"), core("schedule")
    node = nodes.NODE_CLASS_MAPPINGS
    import profile_step

    model, _clip, _vae, pos, neg = profile_step.random_sd15(nodes)
    assert model.model.get_dtype() == torch.float32 and model.model.manual_cast_dtype is None
    lat = args.size // 8
    g = torch.Generator().manual_seed(args.seed)
    with torch.inference_mode(False):
        sd = {k: v.detach().clone().float() for k, v in engine.base_unet_state_dict(model).items()}
        adapter = adapter_mod.new_adapter(None, sd, seed=args.seed)
        del sd
        with torch.no_grad():
            convs = list(adapter.copy.zero_convs.values()) + list(adapter.copy.cross_zero_convs.values())
            for conv in convs + [adapter.encoder.zero_conv]:  # the default adapter: self + cross enhancement
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.05)
        adapter = adapter.eval().requires_grad_(False)
    reference = (torch.randn(1, 4, lat, lat, generator=g), torch.randn(1, 257, 1024, generator=g))
    start_latent = {"samples": torch.randn(1, 4, lat, lat, generator=g) * 0.5}
    schedule = sched_mod.P3SSchedule()
    models = {"plain": model}
    for name in ("fp32", "bf16", "fp16"):
        models[name] = engine.apply_injector(model, adapter, None, schedule, reference=reference,
                                             copy_precision=name)[0]

    def one_step(m, start):
        with torch.inference_mode():
            out = node["KSamplerAdvanced"]().sample(m, "enable", args.seed, 50, 7.5, "ddim", "ddim_uniform", pos,
                                                     neg, start_latent, start, start + 1, "enable")[0]
        return out["samples"].float().clone()

    steps = {"first step (0 of 50)": 0, "middle step (25 of 50)": 25}
    result = {"kind": "copy_precision", "comfyui": comfyui_version.__version__, "device": "cpu",
              "size": args.size, "latent": [lat, lat], "seed": args.seed,
              "setup": "random SD1.5, fp32 UNet; adapter from its UNet (enhancement " + adapter.enhancement + "), "
                       "zero convs N(0, 0.05); random stored "
                       "reference; ddim / ddim_uniform, 50 steps, CFG 7.5, batch 1; default P3S schedule (Eq. 10)",
              "steps": {}}
    for label, start in steps.items():
        outs, secs = {}, {}
        for name, m in models.items():
            t0 = time.perf_counter()
            outs[name] = one_step(m, start)
            secs[name] = round(time.perf_counter() - t0, 2)
        effect = (outs["fp32"] - outs["plain"]).abs()
        row = {"effect_max": float(effect.max()), "effect_mean": float(effect.mean()), "seconds": secs,
               "output_abs_mean": float(outs["fp32"].abs().mean())}
        for name in ("bf16", "fp16"):
            move = (outs[name] - outs["fp32"]).abs()
            finite = bool(torch.isfinite(outs[name]).all())
            row[name] = {"finite": finite, "move_max": float(move.max()), "move_mean": float(move.mean()),
                         "move_over_effect_max": float(move.max() / effect.max()),
                         "move_over_effect_mean": float(move.mean() / effect.mean())}
        result["steps"][label] = row
        print(f"{label}: P3S effect max {row['effect_max']:.4g} mean {row['effect_mean']:.4g}; "
              + "; ".join(f"{n}: move max {row[n]['move_max']:.3g} ({100 * row[n]['move_over_effect_max']:.2f} % of "
                          f"the effect), mean {row[n]['move_mean']:.3g} ({100 * row[n]['move_over_effect_mean']:.2f} %)"
                          for n in ("bf16", "fp16")) + f"; seconds {secs}", flush=True)
    import results_file  # date, command line, machine (CPU, cores, torch)

    results_file.write(args.out, result, None if argv is None else [sys.argv[0], *argv])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
