"""Per-step cost of P3S on diffusers against P3S in ComfyUI (same machine, one run, interleaved).

One "step" = one UNet call with P3S (copy + 16 injected self-attention layers) on a CFG batch of 2,
the random SD1.5 loaded into both engines from the same checkpoint, fp32, the same adapter and the
same (x_t, t, text). Also the plain UNet of each engine. Reports medians and the ratio
diffusers / ComfyUI. Run under the machine-wide semaphore:

    source scripts/env.sh && /work/bin/heavy $P3S_VENV/bin/python benchmarks/bench_engines.py --size 256 --reps 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256, help="image size (latent = size/8)")
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    import harness
    import torch

    base = harness.make_base_dir(Path(tempfile.mkdtemp(prefix="p3s_bench_engines_")))
    nodes, pack = harness.boot_in_process(base)
    import importlib

    import comfy.model_management as mm
    import folder_paths

    core = lambda m: importlib.import_module(f"{pack.__name__}.p3s_core.{m}")  # noqa: E731
    db, backend, adapter_mod, sched_mod = core("diffusers_engine"), core("comfyui_engine"), core("adapter"), core("schedule")
    with torch.inference_mode():
        model, clip, _vae = nodes.NODE_CLASS_MAPPINGS["CheckpointLoaderSimple"]().load_checkpoint(
            "p3s_random_sd15.safetensors")[:3]
        enc = nodes.NODE_CLASS_MAPPINGS["CLIPTextEncode"]()
        cond, uncond = enc.encode(clip, "a photo of sks dog")[0][0][0], enc.encode(clip, "")[0][0][0]
    with torch.inference_mode(False):
        texts = torch.cat([uncond, cond]).float().clone()
        dunet = db.load_unet(folder_paths.get_full_path("checkpoints", "p3s_random_sd15.safetensors"))
        sd = {k: v.detach().clone().float() for k, v in backend.base_unet_state_dict(model).items()}
        adapter = adapter_mod.new_adapter(None, sd, seed=0).eval().requires_grad_(False)
        del sd
    sched = sched_mod.P3SSchedule()
    patched, _ = backend.apply_injector(model, adapter, None, sched)
    mm.load_models_gpu([patched])
    ms = patched.get_model_object("model_sampling")
    lat = args.size // 8
    x = torch.randn(2, 4, lat, lat, generator=torch.Generator().manual_seed(0))
    t = 601
    sigma = ms.sigma(torch.tensor([float(t)])).float().expand(2)
    x_in = x * (sigma[0] ** 2 + 1).sqrt()
    inj = db.P3SDiffusersInjector(dunet, adapter, None, sched, cfg_batch=True)

    def comfy_step(m):
        opts = dict(m.model_options.get("transformer_options", {}))
        opts["wrappers"] = m.wrappers
        opts.update(cond_or_uncond=[1, 0], sigmas=sigma)
        with torch.no_grad():
            return model.model.apply_model(x_in, sigma, c_crossattn=texts, transformer_options=opts)

    def diffusers_step(p3s: bool):
        with torch.no_grad():
            if p3s:
                with inj:
                    return dunet(x, torch.tensor(t), encoder_hidden_states=texts).sample
            return dunet(x, torch.tensor(t), encoder_hidden_states=texts).sample

    cases = {"comfyui_p3s": lambda: comfy_step(patched), "diffusers_p3s": lambda: diffusers_step(True),
             "comfyui_plain": lambda: comfy_step(model), "diffusers_plain": lambda: diffusers_step(False)}
    for fn in cases.values():  # warm-up
        fn()
    times = {k: [] for k in cases}
    for _ in range(args.reps):
        for k, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"size": args.size, "reps": args.reps, "threads": torch.get_num_threads(), "median_s": med,
           "ratio_p3s_diffusers_over_comfyui": med["diffusers_p3s"] / med["comfyui_p3s"],
           "ratio_plain_diffusers_over_comfyui": med["diffusers_plain"] / med["comfyui_plain"],
           "p3s_overhead_comfyui": med["comfyui_p3s"] / med["comfyui_plain"],
           "p3s_overhead_diffusers": med["diffusers_p3s"] / med["diffusers_plain"],
           "spread": {k: [min(v), max(v)] for k, v in times.items()}}
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
