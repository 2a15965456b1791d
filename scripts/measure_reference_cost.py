"""Per-step cost of the Condition Injector's reference modes (issue 12), with the random SD1.5 on this
machine: one sampler step (CFG batch of 2) of the plain model, of P3S with one reference, and of P3S
with "average copy features" over N references. Interleaved rounds, median; ratios are what carry over.

    source scripts/env.sh && /work/bin/heavy $P3S_VENV/bin/python scripts/measure_reference_cost.py --size 256 --refs 3
    ... --out benchmarks/results/reference_cost.json   # the result file the README's figures come from
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--refs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="also write the result file (scripts/results_file.py)")
    a = ap.parse_args()
    import torch

    base = harness.make_base_dir(Path(tempfile.mkdtemp(prefix="p3s_cost_")))
    nodes, pack = harness.boot_in_process(base)
    import importlib

    adapter_mod = importlib.import_module(f"{pack.__name__}.p3s_core.adapter")
    backend = importlib.import_module(f"{pack.__name__}.p3s_core.comfyui_engine")
    N = nodes.NODE_CLASS_MAPPINGS
    with torch.inference_mode():
        model, clip, vae = N["CheckpointLoaderSimple"]().load_checkpoint("p3s_random_sd15.safetensors")[:3]
        clipv = N["CLIPVisionLoader"]().load_clip("p3s_random_clip_vit_l14.safetensors")[0]
        g = torch.Generator().manual_seed(0)
        refs = torch.rand(a.refs, a.size, a.size, 3, generator=g)
        lat, hid = backend.encode_reference(model, vae, clipv, refs)
        cond = N["CLIPTextEncode"]().encode(clip, "a photo of sks dog")[0]
        neg = N["CLIPTextEncode"]().encode(clip, "")[0]
    with torch.inference_mode(False):
        sd = {k: v.detach().clone() for k, v in backend.base_unet_state_dict(model).items()}
        adapter = adapter_mod.new_adapter(unet_state_dict=sd, seed=0).eval().requires_grad_(False)
        adapter.reference = {"latent": lat.clone(), "clip_hidden": hid.clone()}
    inj = N["P3SConditionInjector"]()
    with torch.inference_mode():
        models = {
            "plain": model,
            "one reference": inj.inject(model, adapter)[0],
            f"average of {a.refs}": inj.inject(model, adapter, reference_mode="average copy features")[0],
        }
    latent = N["EmptyLatentImage"]().generate(a.size, a.size, 1)[0]
    times = {k: [] for k in models}

    def one_step(m):
        with torch.inference_mode():
            N["KSampler"]().sample(m, 1, 1, 7.5, "ddim", "normal", cond, neg, latent, denoise=1.0)

    for m in models.values():  # warm-up
        one_step(m)
    for _ in range(a.rounds):
        for k, m in models.items():
            t0 = time.perf_counter()
            one_step(m)
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"size {a.size}x{a.size}, CFG batch 2, {a.rounds} interleaved rounds, median seconds per step:")
    for k, v in med.items():
        print(f"  {k:>16}: {v:.3f} s  ({v / med['plain']:.2f}x plain)")
    extra_one = med["one reference"] - med["plain"]
    extra_avg = med[f"average of {a.refs}"] - med["plain"]
    print(f"P3S overhead: one reference +{extra_one:.3f} s/step; average of {a.refs} +{extra_avg:.3f} s/step "
          f"({extra_avg / extra_one:.2f}x the one-reference overhead)")
    if a.out:
        import results_file

        results_file.write(a.out, {
            "kind": "reference_cost", "size": a.size, "refs": a.refs, "rounds": a.rounds, "cfg_batch": 2,
            "device": "cpu" if not torch.cuda.is_available() else "cuda",
            "step_s": {k: sorted(v) for k, v in times.items()}, "median_step_s": med,
            "ratio_to_plain": {k: v / med["plain"] for k, v in med.items()},
            "overhead_s": {"one reference": extra_one, f"average of {a.refs}": extra_avg},
            "average_over_one_overhead": extra_avg / extra_one})


if __name__ == "__main__":
    main()
