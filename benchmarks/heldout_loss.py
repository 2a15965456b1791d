"""Issue 22.4: P3S against the plain model on held-out denoising loss, through the real nodes.

The P3S Trainer node trains an adapter on two photos of one subject (the random SD1.5 in the real
ComfyUI, in process, on the CPU). Then, on (noise, t) pairs the training never drew (another
generator seed, fixed timesteps), the denoising loss ``||eps - eps_theta(x_t, t, c)||^2`` (Eq. 14's
L_LDM, unweighted) of each photo as the target is measured for

* ``plain``: the SD1.5 MODEL without P3S;
* ``untrained``: the Condition Injector's patch with the adapter as the Trainer starts it (zero convs,
  so f = 0: Eq. 7 as printed appends N zero-logit keys with zero values at every self-attention layer);
* ``trained``: the Condition Injector's patch with the trained adapter;

with the *other* photo as the reference (``reference_index``: photo A's target with photo B's stored
reference and vice versa) and, for comparison, with the target's own photo (as in training). Margins:
``(plain - trained) / plain`` and ``(untrained - trained) / untrained``.

The untrained adapter's dilution per UNet self-attention layer: the fraction of the attention mass
(softmax over Eq. 7's keys, per query and head, averaged) that goes to the appended keys, read from the
real ``attn1`` calls of the patched model (the keys and queries ComfyUI's attention receives).

Run under the machine-wide lock (loads SD1.5):

    source scripts/env.sh && flock /tmp/p3s-heavy.lock $P3S_VENV/bin/python benchmarks/heldout_loss.py

writes ``benchmarks/results/heldout_loss.json``; ``scripts/readme_figures.py`` renders it into the
README. ``tests/integration/test_heldout_loss.py`` runs :func:`measure` through the test fixtures.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "heldout_loss.json"
PROMPT = "a photo of sks dog"


@dataclass
class Settings:
    """The run's settings (all recorded in the JSON)."""
    size: int = 64                 # photo and training resolution (latent = size / 8)
    epochs: int = 10               # of 2 photos: 2 steps each
    learning_rate: float = 1e-4    # the paper's 1e-5 barely moves the random SD1.5 in so few steps
    train_seed: int = 3
    reference_pairing: str = "auto"     # the Trainer's default
    heldout_seed: int = 1234       # the held-out noise: not the Trainer's generator
    timesteps: tuple = (100, 300, 500, 700, 900)
    lam: float = 0.2
    save_name: str = "p3s_heldout"


def photos(size: int) -> torch.Tensor:
    """Two photos of one synthetic subject (an orange block with a darker stripe) at different places on
    different noise backgrounds, ``[2, size, size, 3]``."""
    out = []
    for seed, (y, x) in ((11, (size // 4, size // 3)), (12, (size // 3, size // 5))):
        g = torch.Generator().manual_seed(seed)
        img = torch.rand(size, size, 3, generator=g) * 0.3
        h, w = size // 2, size // 3
        img[y:y + h, x:x + w] = torch.tensor([0.8, 0.5, 0.2])
        img[y + h // 2:y + h // 2 + 2, x:x + w] = torch.tensor([0.3, 0.2, 0.1])
        out.append(img)
    return torch.stack(out)


def heldout_pairs(s: Settings, latent: int):
    g = torch.Generator().manual_seed(s.heldout_seed)
    return [(t, torch.randn(1, 4, latent, latent, generator=g)) for t in s.timesteps]


def denoising_losses(model, context, x0, pairs) -> list:
    """``mean((eps - eps_theta)^2)`` per (t, noise) pair: ``model`` (a ComfyUI MODEL, patched or not)
    predicts from ``x_t = noise_scaling(sigma(t), noise, x0)``; its transformer options and wrappers
    (the Injector's Eq. 10 weight of that t, its copy run) are those a sampler step passes."""
    ms = model.get_model_object("model_sampling")
    opts = dict(model.model_options.get("transformer_options", {}))
    opts["wrappers"] = model.wrappers
    losses = []
    with torch.inference_mode():
        for t, noise in pairs:
            sigma = ms.sigma(torch.tensor([float(t)]))
            xt = ms.noise_scaling(sigma, noise, x0)
            o = dict(opts, cond_or_uncond=[0], sigmas=sigma)
            denoised = model.model.apply_model(xt, sigma, c_crossattn=context, transformer_options=o)
            eps = (xt - denoised) / sigma
            losses.append(float(((eps - noise) ** 2).mean()))
    return losses


class _Attn1Probe:
    """Forward pre-hooks on every ``attn1`` (self-attention) module of a UNet; per layer (the name of the
    block holding it), the mean over calls of what :meth:`mass` reads from the call."""

    def __init__(self, unet):
        self.mass_sum, self.calls, self.handles = {}, {}, []
        for name, mod in unet.named_modules():
            if name.endswith(".attn1"):
                self.handles.append(mod.register_forward_pre_hook(self._hook(name[:-len(".attn1")]),
                                                                  with_kwargs=True))

    def _hook(self, name):
        def hook(attn, args, kwargs):
            with torch.no_grad():
                m = self.mass(name, attn, args, kwargs)
            if m is not None:
                self.mass_sum[name] = self.mass_sum.get(name, 0.0) + m
                self.calls[name] = self.calls.get(name, 0) + 1
            return None
        return hook

    @staticmethod
    def logits(attn, x, ctx):
        """``q k^T / sqrt(d)`` per head, ``[B, heads, Nq, Nk]``, from the layer's own projections."""
        q, k = attn.to_q(x).float(), attn.to_k(ctx).float()
        b, d = q.shape[0], q.shape[-1] // attn.heads
        qh = q.view(b, q.shape[1], attn.heads, d).transpose(1, 2)
        kh = k.view(b, k.shape[1], attn.heads, d).transpose(1, 2)
        return qh @ kh.transpose(-1, -2) / math.sqrt(d)

    def mass(self, name, attn, args, kwargs):
        raise NotImplementedError

    def per_layer(self) -> dict:
        return {n: self.mass_sum[n] / self.calls[n] for n in self.mass_sum}

    def close(self):
        for h in self.handles:
            h.remove()


class AppendedMass(_Attn1Probe):
    """ComfyUI: the mean fraction of the softmax attention mass (over queries, heads, batch) on the
    appended key slot of Eq. 7 as the real attn1 call receives it (K/V interleaved per token, ``[z_0,
    f_0, z_1, f_1, ...]``: the odd keys). ``nonzero`` counts, per layer, calls whose appended keys were
    not all zero (f != 0)."""

    def __init__(self, diffusion_model):
        self.nonzero = {}
        super().__init__(diffusion_model)

    def mass(self, name, attn, args, kwargs):
        x, ctx = args[0], kwargs.get("context")
        if ctx is None or ctx.shape[1] != 2 * x.shape[1]:
            return None
        self.nonzero[name] = self.nonzero.get(name, 0) + int(bool(ctx[:, 1::2].abs().max() > 0))
        return float(torch.softmax(self.logits(attn, x, ctx), dim=-1)[..., 1::2].sum(-1).mean())


def _mean(xs) -> float:
    return sum(xs) / len(xs)


def measure(comfy, sd15, clip_vision, s: Settings | None = None, log=print) -> dict:
    """Train, evaluate, measure. ``comfy``: ``.node(name)`` gives a node class and ``.core(module)`` a
    ``p3s_core`` module as the loaded pack sees it (the tests' fixture, or :func:`boot`)."""
    s = s or Settings()
    engine, adapter_mod = comfy.core("comfyui_engine"), comfy.core("adapter")
    imgs = photos(s.size)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = comfy.node("P3STrainer")().train(
            model=sd15.model, clip=sd15.clip, vae=sd15.vae, clip_vision=clip_vision, images=imgs, prompt=PROMPT,
            identifier="sks", epochs=s.epochs, learning_rate=s.learning_rate, gamma=0.1, resolution=s.size,
            seed=s.train_seed, save_name=s.save_name, save_every=0, reference_pairing=s.reference_pairing)
    train_s = time.perf_counter() - t0
    trained = out["result"][0]
    log(f"heldout_loss: trained {trained.training_info['steps']} steps in {train_s:.0f}s")
    with torch.inference_mode(False):
        sd = {k: v.detach().clone() for k, v in engine.base_unet_state_dict(sd15.model).items()}
        untrained = adapter_mod.new_adapter(unet_state_dict=sd, seed=s.train_seed)  # the Trainer's start
        del sd
    untrained.reference = trained.reference
    untrained = untrained.eval().requires_grad_(False)
    with torch.inference_mode():
        context = comfy.node("CLIPTextEncode")().encode(sd15.clip, PROMPT)[0][0][0]
    latents = trained.reference["latent"]  # the two photos' VAE latents, as the Trainer encoded them
    pairs = heldout_pairs(s, s.size // 8)
    inject = comfy.node("P3SConditionInjector")().inject

    def patched(adapter, ref):
        with torch.inference_mode():
            return inject(sd15.model, adapter, lam=s.lam, strength=1.0, apply_to="cond and uncond",
                          reference_index=ref)[0]

    cases, dilution_runs = [], []
    for target in (0, 1):
        x0 = latents[target:target + 1]
        plain = denoising_losses(sd15.model, context, x0, pairs)
        for ref, kind in ((1 - target, "other photo"), (target, "same photo")):
            probe = AppendedMass(sd15.model.model.diffusion_model)
            try:
                untr = denoising_losses(patched(untrained, ref), context, x0, pairs)
            finally:
                probe.close()
            if any(probe.nonzero.values()) or len(probe.calls) != 16:
                raise RuntimeError(f"untrained adapter: appended keys not all zero or not 16 layers: {probe.calls}")
            if kind == "other photo":
                dilution_runs.append(probe.per_layer())
            tr = denoising_losses(patched(trained, ref), context, x0, pairs)
            cases.append({"target": target, "reference": ref, "reference_kind": kind, "plain": plain,
                          "untrained": untr, "trained": tr})
    summary = summarise(cases)
    layers = list(dilution_runs[0])
    dilution = {n: _mean([r[n] for r in dilution_runs]) for n in layers}
    info = trained.training_info
    return {"settings": {**asdict(s), "timesteps": list(s.timesteps), "prompt": PROMPT, "photos": 2},
            "training": {"steps": info["steps"], "loss": info["loss"], "seconds": round(train_s, 1),
                         "enhancement": trained.enhancement, "pairing_used": info.get("reference_pairing")},
            "summary": summary, "cases": cases,
            "dilution_untrained": {"per_layer": dilution, "mean": _mean(list(dilution.values())),
                                   "min": min(dilution.values()), "max": max(dilution.values())}}


def summarise(cases: list, kinds=("other photo", "same photo")) -> dict:
    """Mean losses over the cases of each reference kind and the margins between them."""
    summary = {}
    for kind in kinds:
        sel = [c for c in cases if c["reference_kind"] == kind]
        m = {v: _mean([x for c in sel for x in c[v]]) for v in ("plain", "untrained", "trained")}
        m["trained_vs_plain"] = (m["plain"] - m["trained"]) / m["plain"]
        m["trained_vs_untrained"] = (m["untrained"] - m["trained"]) / m["untrained"]
        m["untrained_vs_plain"] = (m["plain"] - m["untrained"]) / m["plain"]
        m["trained_beats_plain_pairs"] = sum(a < b for c in sel for a, b in zip(c["trained"], c["plain"]))
        m["pairs"] = sum(len(c["plain"]) for c in sel)
        summary[kind] = m
    return summary


class ZeroKeyMass(_Attn1Probe):
    """diffusers (whose P3S processor builds Eq. 7's keys inside): the mean softmax mass that N appended
    zero-logit keys take, ``N / (N + sum_j exp(q k_j / sqrt d))`` per query and head, from the layer's
    own queries and keys (what the untrained adapter's f = 0 appends)."""

    def mass(self, name, attn, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        lse = torch.logsumexp(self.logits(attn, x, x), dim=-1)
        return float(torch.sigmoid(math.log(x.shape[1]) - lse).mean())  # n e^0 / (n e^0 + e^lse)


def measure_toyworld(seed: int = 0, timesteps=Settings.timesteps, heldout_seed: int = Settings.heldout_seed,
                     log=print, world_seed: int | None = None, enhancement: str | None = None,
                     reference_pairing: str = "auto") -> dict:
    """The same comparison on the toy world's *trained* denoiser (``benchmarks/toyworld``, CI size):
    P3S trained through the diffusers engine's step (the toy world's run settings: 4 photos, 240
    steps), evaluated through :class:`P3SDiffusersInjector` (the same Eq. 7-10 as the Condition
    Injector, ``tests/integration/test_parity.py``), each photo as the target with the next photo as
    the reference; the untrained adapter's dilution per layer under its injection. ``seed``: the photos'
    and the training's; ``world_seed``: the world's (default ``seed``); ``enhancement`` (None: the
    Trainer's default) and ``reference_pairing``: the training's (:func:`measure_toyworld_ablation`)."""
    from benchmarks.toyworld import build as B
    from benchmarks.toyworld import p3s_path as P
    from p3s_core import diffusers_engine as db
    from p3s_core.diffusers_engine.training import training_betas
    from p3s_core.schedule import P3SSchedule

    world = P.ToyWorld(B.build(seed if world_seed is None else world_seed, "ci", threads=1, log=log))
    photos = P.make_photos(0, seed)
    cleaned = P.rngr_clean(world, photos, "both points")
    prompt = P.train_prompt(photos)
    rs = P.RunSettings(seed=seed, enhancement=enhancement, reference_pairing=reference_pairing)
    t0 = time.perf_counter()
    trained, result = P.train_p3s(world, cleaned, prompt, rs)
    train_s = time.perf_counter() - t0
    untrained = P.untrained_adapter(world, seed=seed, lam=rs.lam)
    batches = P.batches_for(world, cleaned.images, cleaned.masks, prompt)
    abar = torch.cumprod(1 - training_betas(B.SCHEDULER), 0)
    g = torch.Generator().manual_seed(heldout_seed)
    shape = tuple(batches[0].latent.shape)
    pairs = [(t, torch.randn(shape, generator=g)) for t in timesteps]
    images = torch.from_numpy(__import__("numpy").stack(cleaned.images))

    def losses(x0, ctx, adapter=None, ref=0, probe=False):
        out, hooks = [], ZeroKeyMass(world.unet) if probe else None
        inj = None
        if adapter is not None:
            i2 = db.encode_reference(world.vae, world.vision, images, adapter=adapter)
            inj = db.P3SDiffusersInjector(world.unet, adapter, i2, P3SSchedule(), lam=rs.lam,
                                          reference_index=ref).install()
        try:
            with torch.no_grad():
                for t, noise in pairs:
                    a = abar[t]
                    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
                    eps = world.unet(xt, torch.tensor([t]), encoder_hidden_states=ctx).sample
                    out.append(float(((eps - noise) ** 2).mean()))
        finally:
            if inj is not None:
                inj.remove()
            if hooks is not None:
                hooks.close()
        return out, (hooks.per_layer() if hooks is not None else None)

    cases, dil = [], []
    n = len(batches)
    for target, b in enumerate(batches):
        plain, _ = losses(b.latent, b.context)
        for ref, kind in (((target + 1) % n, "other photo"), (target, "same photo")):
            untr, per = losses(b.latent, b.context, untrained, ref, probe=kind == "other photo")
            if per is not None:
                dil.append(per)
            tr, _ = losses(b.latent, b.context, trained, ref)
            cases.append({"target": target, "reference": ref, "reference_kind": kind, "plain": plain,
                          "untrained": untr, "trained": tr})
    dilution = {k: _mean([r[k] for r in dil]) for k in dil[0]}
    return {"settings": {"world": f"toyworld ci seed {seed if world_seed is None else world_seed}", "photos": n,
                         "steps": rs.steps, "lr": rs.lr, "timesteps": list(timesteps), "heldout_seed": heldout_seed,
                         "prompt": prompt, "enhancement": trained.enhancement,
                         "reference_pairing": rs.reference_pairing, "pairing_used": result.reference_pairing},
            "training": {"seconds": round(train_s, 1)}, "summary": summarise(cases), "cases": cases,
            "dilution_untrained": {"per_layer": dilution, "mean": _mean(list(dilution.values())),
                                   "min": min(dilution.values()), "max": max(dilution.values())}}


#: The ablation of issue 22's decision: (enhancement, reference pairing) of the training.
ABLATION = (("self", "self"), ("cross", "self"), ("cross", "other photo"), ("self", "other photo"))


def measure_toyworld_ablation(seeds=(0, 1, 2), log=print) -> dict:
    """Why the cross-attention enhancement trains with another photo as its reference: the toy world's
    held-out loss (other photo as the reference) of the plain denoiser and of an adapter trained with
    each :data:`ABLATION` pair, on world 0 with photos and training draws of each seed."""
    rows = []
    for enhancement, pairing in ABLATION:
        per_seed = []
        for seed in seeds:
            r = measure_toyworld(seed, log=lambda *a: None, world_seed=0, enhancement=enhancement,
                                 reference_pairing=pairing)
            m = r["summary"]["other photo"]
            per_seed.append({"seed": seed, "plain": m["plain"], "trained": m["trained"],
                             "trained_vs_plain": m["trained_vs_plain"], "same_photo": r["summary"]["same photo"]["trained"],
                             "wins": m["trained_beats_plain_pairs"], "pairs": m["pairs"]})
            log(f"ablation {enhancement}/{pairing} seed {seed}: trained vs plain {m['trained_vs_plain']:+.1%}")
        rows.append({"enhancement": enhancement, "reference_pairing": pairing, "per_seed": per_seed,
                     "mean_trained_vs_plain": _mean([x["trained_vs_plain"] for x in per_seed])})
    return {"seeds": list(seeds), "world": "toyworld ci seed 0", "rows": rows}


def boot():
    """The real ComfyUI in process with the random SD1.5 and CLIP vision (as the tests' fixtures)."""
    sys.path.insert(0, str(REPO / "scripts"))
    import importlib

    import harness

    base = harness.make_base_dir(Path(tempfile.mkdtemp(prefix="p3s_heldout_")))
    nodes, pack = harness.boot_in_process(base)
    comfy = SimpleNamespace(node=lambda n: nodes.NODE_CLASS_MAPPINGS[n],
                            core=lambda m: importlib.import_module(f"{pack.__name__}.p3s_core.{m}"))
    with torch.inference_mode():
        model, clip, vae = comfy.node("CheckpointLoaderSimple")().load_checkpoint("p3s_random_sd15.safetensors")[:3]
        cv = comfy.node("CLIPVisionLoader")().load_clip("p3s_random_clip_vit_l14.safetensors")[0]
    return comfy, SimpleNamespace(model=model, clip=clip, vae=vae), cv


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = Settings()
    ap.add_argument("--part", default="all", choices=("all", "comfyui", "toyworld", "ablation"),
                    help="the random SD1.5 in ComfyUI, the toy world, the toy world's enhancement x pairing "
                         "ablation, or all (a part run alone keeps the other parts of an existing --out file)")
    ap.add_argument("--size", type=int, default=d.size)
    ap.add_argument("--epochs", type=int, default=d.epochs)
    ap.add_argument("--lr", type=float, default=d.learning_rate)
    ap.add_argument("--pairing", default=d.reference_pairing, choices=("auto", "self", "other photo"))
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="JSON file to write")
    args = ap.parse_args(argv)
    s = Settings(size=args.size, epochs=args.epochs, learning_rate=args.lr, reference_pairing=args.pairing)
    out = Path(args.out)
    result = json.loads(out.read_text()) if args.part != "all" and out.is_file() else {}
    if str(REPO / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO / "scripts"))
    import results_file

    # Each part carries its own stamp (date, command, machine; a part run alone keeps the other's).
    run = {**results_file.stamp(None if argv is None else ["benchmarks/heldout_loss.py", *argv]), "torch": torch.__version__}
    if args.part in ("all", "comfyui"):
        t0 = time.perf_counter()
        comfy, sd15, cv = boot()
        result["comfyui"] = measure(comfy, sd15, cv, s)
        result["comfyui"]["run"] = {**run, "model": "the random-weight SD1.5 (scripts/setup.sh), fp32, CPU",
                                    "total_s": round(time.perf_counter() - t0, 1)}
        out.write_text(json.dumps(result, indent=2) + "\n")
    if str(REPO) not in sys.path:
        sys.path.append(str(REPO))  # benchmarks.toyworld, p3s_core (after ComfyUI's own modules)
    toy = "the toy world's trained denoiser (build.py --seed 0 --size ci)"
    if args.part in ("all", "toyworld"):
        t0 = time.perf_counter()
        torch.set_num_threads(1)
        result["toyworld"] = measure_toyworld()
        result["toyworld"]["run"] = {**run, "model": toy, "total_s": round(time.perf_counter() - t0, 1)}
    if args.part in ("all", "ablation"):
        t0 = time.perf_counter()
        torch.set_num_threads(1)
        result["toyworld_ablation"] = measure_toyworld_ablation()
        result["toyworld_ablation"]["run"] = {**run, "model": toy, "total_s": round(time.perf_counter() - t0, 1)}
    out.write_text(json.dumps(result, indent=2) + "\n")
    for row in result.get("toyworld_ablation", {}).get("rows", []):
        print(f"ablation {row['enhancement']} / {row['reference_pairing']}: trained vs plain "
              f"{row['mean_trained_vs_plain']:+.1%} (mean of {len(row['per_seed'])} seeds)")
    for part, r in ((k, v) for k, v in result.items() if k != "toyworld_ablation"):
        for kind, m in r["summary"].items():
            print(f"{part}, {kind}: plain {m['plain']:.4f} untrained {m['untrained']:.4f} trained {m['trained']:.4f} "
                  f"(trained vs plain {m['trained_vs_plain']:+.1%}, vs untrained {m['trained_vs_untrained']:+.1%})")
        print(f"{part} dilution per layer:", {k: round(v, 3) for k, v in r["dilution_untrained"]["per_layer"].items()})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
