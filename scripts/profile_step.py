"""Where a P3S sampling step goes: the plain UNet, the copy (Eq. 6), and the extra self-attention
of Eq. 7-8 per UNet level, measured inside real KSampler steps of the real ComfyUI.

    source scripts/env.sh   # P3S_VENV
    $P3S_VENV/bin/python scripts/profile_step.py --size 512 --attention sdpa   # prints JSON
    $P3S_VENV/bin/python scripts/profile_step.py --size 256 --attention subquad --reps 3

Method: timing hooks (``time.perf_counter`` around ``forward``; a CUDA sync when on a GPU) on the
base UNet (``diffusion_model``), on each of its 16 self-attention modules (``attn1``: projections,
kernel and output, grouped by level) and on the adapter's copy. One-step KSampler runs of the plain
model and of the P3S model alternate; per UNet evaluation (CFG batch of 2), the medians give

- ``plain_step_s`` / ``p3s_step_s``: the whole sampling step (KSampler, one step);
- ``plain_unet_s``: the plain UNet; ``p3s_unet_s``: the P3S UNet call (the copy runs inside it,
  in the DIFFUSION_MODEL wrapper); ``copy_s``: the copy;
- ``attn1_plain_s[level]`` / ``attn1_p3s_s[level]``: self-attention time per level (0 = 64x64
  tokens at 512^2 ... 3 = middle), and ``extra_attention_s[level]`` their difference;
- ``other_s``: what is left (wrapper, patch, concatenations, noise in the rest of the UNet).

``benchmarks/run.py`` calls :func:`profile_step` in its own run and stores the result in
``benchmarks/results/bench.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: copy_unet layer key -> level, as ``LAYER_MAP`` says (input 1,2 / output 9-11 at level 0, ...).
LEVELS = (0, 1, 2, 3)


def _attn1_modules(diffusion_model, layer_map):
    """``{module: level}`` for the 16 SD1.5 self-attention modules of a ComfyUI UNet."""
    out = {}
    for e in layer_map:
        name, idx = e["block"]
        if name == "middle":
            path = "middle_block.1.transformer_blocks.0.attn1"
        else:
            path = f"{name}_blocks.{idx}.1.transformer_blocks.0.attn1"
        out[diffusion_model.get_submodule(path)] = e["level"]
    return out


class _Timer:
    """Sums forward times per label while ``active``."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.sums: dict = {}
        self.counts: dict = {}
        self._t0: dict = {}
        self.handles = []

    def _now(self):
        if self.cuda:
            import torch
            torch.cuda.synchronize()
        return time.perf_counter()

    def watch(self, module, label):
        def pre(mod, args, kwargs=None):
            self._t0[id(mod)] = self._now()

        def post(mod, args, out):
            dt = self._now() - self._t0.pop(id(mod))
            self.sums[label] = self.sums.get(label, 0.0) + dt
            self.counts[label] = self.counts.get(label, 0) + 1

        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def reset(self):
        self.sums, self.counts = {}, {}

    def close(self):
        for h in self.handles:
            h.remove()


def profile_step(nodes, plain_model, p3s_model, adapter, pos, neg, size: int, reps: int = 2,
                 layer_map=None) -> dict:
    """Profile one sampling step at ``size``^2 (see the module docstring). ``p3s_model`` is the
    injector's output for ``plain_model``; ``adapter`` its adapter. Returns a JSON-friendly dict."""
    import torch

    if layer_map is None:
        from p3s_core.copy_unet import LAYER_MAP as layer_map  # noqa: N811
    dm = plain_model.get_model_object("diffusion_model")
    cuda = next(dm.parameters()).device.type == "cuda"
    timer = _Timer(cuda)
    timer.watch(dm, "unet")
    for mod, level in _attn1_modules(dm, layer_map).items():
        timer.watch(mod, f"attn1_{level}")
    timer.watch(adapter.copy, "copy")
    latent = nodes.NODE_CLASS_MAPPINGS["EmptyLatentImage"]().generate(size, size, 1)[0]
    sampler = nodes.NODE_CLASS_MAPPINGS["KSampler"]()
    rows = {"plain": [], "p3s": []}
    try:
        for rep in range(reps + 1):  # the first round is a warm-up
            for name in (("plain", "p3s") if rep % 2 == 0 else ("p3s", "plain")):
                m = plain_model if name == "plain" else p3s_model
                timer.reset()
                t0 = timer._now()
                with torch.inference_mode():
                    sampler.sample(m, 1, 1, 7.5, "ddim", "normal", pos, neg, latent, denoise=1.0)
                step = timer._now() - t0
                if rep == 0:
                    continue
                calls = max(timer.counts.get("unet", 1), 1)  # UNet evaluations in that step
                row = {"step_s": step / calls, "unet_s": timer.sums.get("unet", 0.0) / calls,
                       "copy_s": timer.sums.get("copy", 0.0) / calls, "unet_calls": calls}
                for level in LEVELS:
                    row[f"attn1_{level}"] = timer.sums.get(f"attn1_{level}", 0.0) / calls
                rows[name].append(row)
    finally:
        timer.close()

    def med(name, key):
        return statistics.median(r[key] for r in rows[name])

    plain_unet, p3s_unet, copy_s = med("plain", "unet_s"), med("p3s", "unet_s"), med("p3s", "copy_s")
    out = {"size": size, "reps": reps, "unet_calls_per_step": rows["p3s"][0]["unet_calls"],
           "plain_step_s": med("plain", "step_s"), "p3s_step_s": med("p3s", "step_s"),
           "plain_unet_s": plain_unet, "p3s_unet_s": p3s_unet, "copy_s": copy_s,
           "attn1_plain_s": {str(lv): med("plain", f"attn1_{lv}") for lv in LEVELS},
           "attn1_p3s_s": {str(lv): med("p3s", f"attn1_{lv}") for lv in LEVELS}}
    out["extra_attention_s"] = {lv: out["attn1_p3s_s"][lv] - out["attn1_plain_s"][lv]
                                for lv in out["attn1_plain_s"]}
    out["other_s"] = (out["p3s_step_s"] - out["plain_step_s"] - copy_s
                      - sum(out["extra_attention_s"].values()))
    return out


def random_sd15(nodes, prompt: str = "a photo of sks dog"):
    """``(model, clip, vae, pos, neg)``: the random SD1.5 through the core loader, and the prompt's
    and the empty prompt's conditioning (what the benchmarks sample with)."""
    import torch

    node = nodes.NODE_CLASS_MAPPINGS
    with torch.inference_mode():
        model, clip, vae = node["CheckpointLoaderSimple"]().load_checkpoint("p3s_random_sd15.safetensors")[:3]
        enc = node["CLIPTextEncode"]()
        return model, clip, vae, enc.encode(clip, prompt)[0], enc.encode(clip, "")[0]


def build_models(nodes, pack, size: int) -> dict:
    """The random SD1.5 + a P3S adapter initialised from it (active zero convs), as the benchmark
    builds them: a dict with ``model``, ``p3s``, ``p3s0`` (weight 0), ``p3s_pooled`` (the opt-in
    pooled level-0 keys), ``adapter``, ``backend`` (the pack's comfyui_engine), ``pos``/``neg``,
    ``cpos``/``cneg`` (with a ControlNet), ``reg1``/``reg2`` (one injector on the left half, a second
    on the right, issue 16)."""
    import importlib

    import torch

    core = lambda m: importlib.import_module(f"{pack.__name__}.p3s_core.{m}")  # noqa: E731
    node = nodes.NODE_CLASS_MAPPINGS
    with torch.inference_mode():
        model, clip, vae = node["CheckpointLoaderSimple"]().load_checkpoint("p3s_random_sd15.safetensors")[:3]
        clipv = node["CLIPVisionLoader"]().load_clip("p3s_random_clip_vit_l14.safetensors")[0]
        cn = node["ControlNetLoader"]().load_controlnet("p3s_random_controlnet_sd15.safetensors")[0]
        pos = node["CLIPTextEncode"]().encode(clip, "a photo of sks dog")[0]
        neg = node["CLIPTextEncode"]().encode(clip, "")[0]
        hint = torch.zeros(1, size, size, 3)
        hint[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1.0
        cpos, cneg = node["ControlNetApplyAdvanced"]().apply_controlnet(pos, neg, cn, hint, 1.0, 0.0, 1.0, vae=vae)[:2]
    with torch.inference_mode(False):
        sd = {k: v.detach().clone() for k, v in core("comfyui_engine").base_unet_state_dict(model).items()}
        adapter = core("adapter").new_adapter(core("copy_unet").CopyUNetConfig.sd15(), sd, seed=0)
        del sd
        with torch.no_grad():
            for conv in adapter.copy.zero_convs.values():
                conv.weight.normal_(0, 0.01)
    adapter = adapter.eval().requires_grad_(False)
    ref = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(0))
    inj = node["P3SConditionInjector"]()
    out = {"model": model, "adapter": adapter, "backend": core("comfyui_engine"),
           "pos": pos, "neg": neg, "cpos": cpos, "cneg": cneg}
    with torch.inference_mode():
        out["p3s"] = inj.inject(model, adapter, ref, vae, clipv, 0.2, 1.0, "cond and uncond")[0]
        out["p3s0"] = inj.inject(model, adapter, ref, vae, clipv, 0.2, 0.0, "cond and uncond")[0]
        out["p3s_pooled"] = inj.inject(model, adapter, ref, vae, clipv, 0.2, 1.0, "cond and uncond",
                                       level0_keys="pooled 2x2 (faster)")[0]
        left = torch.zeros(1, size, size)
        left[:, :, : size // 2] = 1.0
        out["reg1"] = inj.inject(model, adapter, ref, vae, clipv, 0.2, 1.0, "cond and uncond", region=left)[0]
        out["reg2"] = inj.inject(out["reg1"], adapter, ref.flip(2), vae, clipv, 0.2, 1.0, "cond and uncond",
                                 region=1.0 - left)[0]
    return out


def boot(attention: str, device: str = "cpu"):
    """The real ComfyUI in this process with the given attention backend: ``"subquad"`` (its CPU
    default) or ``"sdpa"`` (``--use-pytorch-cross-attention``). Returns ``(nodes, pack, kernel)``."""
    import tempfile

    sys.path.insert(0, str(REPO / "scripts"))
    import harness

    sys.path.insert(0, str(harness.comfyui_dir()))
    import comfy.cli_args

    comfy.cli_args.args.use_pytorch_cross_attention = attention == "sdpa"
    comfy.cli_args.args.use_quad_cross_attention = attention == "subquad"
    base = harness.make_base_dir(Path(tempfile.mkdtemp(prefix="p3s_bench_")))
    nodes, pack = harness.boot_in_process(base, cpu=device == "cpu")
    import comfy.ldm.modules.attention as attn

    kernel = attn.optimized_attention.__name__
    expected = {"sdpa": "attention_pytorch", "subquad": "attention_sub_quad"}[attention]
    if kernel != expected:
        raise RuntimeError(f"ComfyUI chose {kernel} for --attention {attention} (expected {expected})")
    return nodes, pack, kernel


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--attention", choices=["sdpa", "subquad"], default="subquad")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args(argv)
    nodes, pack, kernel = boot(args.attention, args.device)
    m = build_models(nodes, pack, args.size)
    import importlib

    layer_map = importlib.import_module(f"{pack.__name__}.p3s_core.copy_unet").LAYER_MAP
    res = profile_step(nodes, m["model"], m["p3s"], m["adapter"], m["pos"], m["neg"], args.size, args.reps, layer_map)
    res["attention"], res["kernel"] = args.attention, kernel
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
