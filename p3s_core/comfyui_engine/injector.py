"""The ComfyUI engine: the Condition Injector's patch (Eq. 6-10 at sampling time)."""
from __future__ import annotations

import uuid
from dataclasses import dataclass

import torch

from ..copy_unet import LAYER_MAP, cross_key, layer_key
from ..errors import ModelMismatchError
from ..injection import (DEFAULT_LAMBDA, append_kv_slot, enhanced_cross_output, injected_context_value,
                         pooled_tokens, resize_tokens, token_grid)
from ..region import Region
from .adapter_loading import adapter_patcher, comfy_twin
from .attention_route import ExtendedAttentionRoute, describe_patch
from .checks import check_sd15
from .region_patch import RegionalInjection, RegionRun

APPLY_TO = ("cond and uncond", "cond only")
#: The cross-attention enhancement at sampling (issue 22): what the adapter holds, or switched off
#: (the self-attention injection only, as a format-1 adapter).
CROSS_ATTENTION = ("as the adapter holds", "off")


def _layer_key(extra_options) -> str:
    return layer_key(extra_options["block"], extra_options.get("block_index", 0))


#: copy_unet layer key -> UNet level (0 = the highest resolution)
_LEVEL = {e["key"]: e["level"] for e in LAYER_MAP}


@dataclass
class _Bank:
    """Per-step features of one injector, passed down in ``transformer_options`` (never stored)."""
    features: dict
    weight: float
    active: torch.Tensor | None
    lam: float
    replaced: frozenset = frozenset()  # attn1 blocks another node replaced in this model call
    others: tuple = ()  # names of the other nodes' attn1 patches (for error messages)
    region: object = None  # RegionRun of this step when the injector has a region (issue 16)
    route: object = None  # ExtendedAttentionRoute of this step (None: ComfyUI's kernel for every call)
    pool_level0: bool = False  # opt-in: level-0 copy tokens pooled 2x2 in the extra keys (LEVEL0_KEYS)


#: ``extra_options`` key (one dict per transformer-block call) counting the K/V entries per token
#: after the P3S patches that already ran in this block: 1 = the layer's own z.
KV_SLOTS = "p3s_kv_slots"


def _replaced_attn1(transformer_options) -> frozenset:
    return frozenset((transformer_options.get("patches_replace") or {}).get("attn1", {}) or ())


def _other_attn1_patches(transformer_options) -> tuple:
    patches = (transformer_options.get("patches") or {}).get("attn1_patch", ())
    return tuple(dict.fromkeys(describe_patch(p) for p in patches if not isinstance(p, P3SInjectorPatch)))


#: Level-0 extra keys (issue 14): "all (exact)" is Eq. 7 as written; the opt-in pools the copy
#: feature 2x2 in the extra K/V of the four-times-larger level-0 layers (a quarter of their extra
#: attention cost; the value's ``z + lam f`` keeps every token). Not the paper's; measured in the benchmark.
LEVEL0_KEYS = ("all (exact)", "pooled 2x2 (faster)")

#: The copy's and encoder's compute dtype (issue 21): by default the dtype the UNet computes in (the
#: dtype of its input, fp16 / bf16 / fp32), or fp32 (weights cast to fp32 per layer; more memory
#: traffic, slower on GPUs). The node offers these two; the engine also takes "fp16" and "bf16"
#: (forced, e.g. to measure their effect beside an fp32 UNet).
COPY_PRECISIONS = ("same as the UNet", "fp32")
_FORCED_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class P3SInjectorPatch(RegionalInjection):
    """The attn1 patch (Eq. 7-8) and the per-step DIFFUSION_MODEL wrapper (Eq. 6, 9-10) of one adapter.

    The wrapper runs the trainable copy once per sampling step and hands its 16 features to the
    attn1 patch through a per-call copy of ``transformer_options`` under ``self.key``; nothing
    per-run is stored on this object, so clones sharing it stay independent. ``to()`` returns
    ``self`` (ComfyUI would otherwise cast a patch module to the UNet's fp16); the adapter is moved
    by ComfyUI's model management through :meth:`models` / ``set_additional_models``.

    Reference: ``i2`` (I'', ready) or ``reference = (latent I', clip_hidden c_s)``, encoded each
    step by the encoder (Eq. 4-5) on the step's device in the compute dtype. ``comfy_ops`` (default:
    True unless ``feature_hook`` is given, i.e. training): the copy and encoder run as their
    :func:`~.adapter_loading.comfy_twin` (ComfyUI's cast-capable layers) on the UNet input's device
    in the ``copy_precision`` dtype (:data:`COPY_PRECISIONS`); otherwise the adapter's own layers
    run on its parameters' device and dtype (training, and the tests that run without ComfyUI).
    """

    def __init__(self, adapter, i2: torch.Tensor | None, schedule, lam: float = DEFAULT_LAMBDA,
                 strength: float = 1.0, apply_to: str = "cond and uncond", model_sampling=None,
                 feature_hook=None, reference_index: int = 0, reference_mode: str = "one reference",
                 region: Region | None = None, level0_keys: str = LEVEL0_KEYS[0], reference=None,
                 copy_precision: str = COPY_PRECISIONS[0], comfy_ops: bool | None = None,
                 cross_attention: str = CROSS_ATTENTION[0]):
        from ..encoder import REFERENCE_MODES

        if cross_attention not in CROSS_ATTENTION:
            raise ValueError(f"cross_attention must be one of {CROSS_ATTENTION}")
        #: issue 22: the cross-attention enhancement runs (the adapter has it and it is not off)
        self.cross = cross_attention == CROSS_ATTENTION[0] and getattr(adapter, "enhancement", "self") == "cross"
        if apply_to not in APPLY_TO:
            raise ValueError(f"apply_to must be one of {APPLY_TO}")
        if copy_precision not in COPY_PRECISIONS and copy_precision not in _FORCED_DTYPES:
            raise ValueError(f"copy_precision must be one of {COPY_PRECISIONS + tuple(_FORCED_DTYPES)}")
        if i2 is not None and reference is not None:
            raise ValueError("give i2 or reference, not both")
        self.copy_precision = copy_precision
        self.comfy_ops = feature_hook is None if comfy_ops is None else bool(comfy_ops)
        self.reference = None if reference is None else tuple(reference)
        if reference_mode not in REFERENCE_MODES:
            raise ValueError(f"reference_mode must be one of {REFERENCE_MODES}")
        if level0_keys not in LEVEL0_KEYS:
            raise ValueError(f"level0_keys must be one of {LEVEL0_KEYS}")
        self.pool_level0 = level0_keys == LEVEL0_KEYS[1]
        self.key = f"p3s_{uuid.uuid4().hex[:12]}"
        self.adapter = adapter
        self.i2 = i2
        self.schedule = schedule
        self.lam = float(lam)
        self.strength = float(strength)
        self.apply_to = apply_to
        self.feature_hook = feature_hook  # training: sees the copy's outputs (attention map)
        self.reference_index = int(reference_index)
        self.reference_mode = reference_mode
        self._warned_sizes: set = set()
        self._warned_pooling = False
        self.region = region  # issue 16: inject only inside this region (None = everywhere)
        self.num_timesteps = 1000
        self.sigma_start = self.sigma_end = None
        if model_sampling is not None:
            self.num_timesteps = int(getattr(model_sampling, "num_timesteps", len(model_sampling.sigmas)))
            if schedule is not None:
                self.sigma_start = float(model_sampling.percent_to_sigma(schedule.start_percent))
                self.sigma_end = float(model_sampling.percent_to_sigma(schedule.end_percent))

    # ComfyUI calls these ------------------------------------------------------------------------
    def to(self, *args, **kwargs):
        return self

    def __deepcopy__(self, memo):
        """Shared, not copied: ComfyUI 0.3.75's ``clone()`` deep-copies ``model_options`` and with
        them this patch, which would copy the adapter (718 MB) per clone. Nothing per run is
        stored here, so sharing is safe (ComfyUI 0.33's ``clone()`` shares patch objects too)."""
        return self

    def models(self):
        return [self.adapter_patcher()]

    def adapter_patcher(self):
        return adapter_patcher(self.compute_adapter())

    def compute_adapter(self):
        """The module that computes: the adapter's ComfyUI twin, or the adapter (``comfy_ops`` False)."""
        return comfy_twin(self.adapter) if self.comfy_ops else self.adapter

    def compute_dtype(self, unet_dtype: torch.dtype) -> torch.dtype:
        """The copy's dtype beside a UNet computing in ``unet_dtype`` (see :data:`COPY_PRECISIONS`)."""
        if self.copy_precision in _FORCED_DTYPES:
            return _FORCED_DTYPES[self.copy_precision]
        return unet_dtype if unet_dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32

    # the weight of this step ---------------------------------------------------------------------
    def step_weight(self, sigma: float, timestep: float) -> float:
        """Eq. 9-10: eps_t times strength, 0 outside the start/end window (ComfyUI's sigma idiom)."""
        if self.strength == 0.0:
            return 0.0
        if self.schedule is None:
            return self.strength
        if self.sigma_start is not None and not (self.sigma_end <= sigma <= self.sigma_start):
            return 0.0
        from ..schedule import timestep_to_t_over_T

        t_over_T = timestep_to_t_over_T(min(max(timestep, 0.0), self.num_timesteps - 1), self.num_timesteps)
        return float(self.schedule.curve(t_over_T)) * self.strength

    def _active_rows(self, batch: int, cond_or_uncond) -> torch.Tensor | None:
        if self.apply_to == "cond and uncond" or not cond_or_uncond:
            return None
        chunk = batch // len(cond_or_uncond)
        rows = [c == 0 for c in cond_or_uncond for _ in range(chunk)]
        return torch.tensor(rows, dtype=torch.bool)

    def diffusion_wrapper(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        sigmas = transformer_options.get("sigmas")
        if sigmas is None and self.sigma_start is not None and self.strength != 0.0:
            # Without the step's sigma the start/end window cannot be placed: refusing beats a
            # silently plain image (the window test would read sigma as missing = outside).
            raise ModelMismatchError(
                "model", "the sampler gave the UNet no sigmas (transformer_options['sigmas']), so the P3S "
                "schedule's start/end window cannot be placed at this step",
                "sample with ComfyUI's own KSampler / SamplerCustom nodes, or with a sampler node that "
                "passes ComfyUI's transformer_options through")
        sigma = float(sigmas.max()) if sigmas is not None else float("inf")
        weight = self.step_weight(sigma, float(timesteps.max()))
        if weight == 0.0 or (self.region is not None and self.region.empty):
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        active = self._active_rows(x.shape[0], transformer_options.get("cond_or_uncond"))
        if active is not None and not bool(active.any()):
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        feats = self.copy_features(x, timesteps, context, active)
        options = dict(transformer_options)
        route = None
        if ExtendedAttentionRoute.enabled:
            route = ExtendedAttentionRoute(transformer_options.get("optimized_attention_override"))
            options["optimized_attention_override"] = route
        options[self.key] = _Bank(features=feats, weight=weight, active=active, lam=self.lam,
                                  replaced=_replaced_attn1(transformer_options),
                                  others=_other_attn1_patches(transformer_options), route=route,
                                  pool_level0=self._pool_level0(transformer_options))
        if self.region is not None:
            options[self.key].region = RegionRun(self.region, getattr(executor, "class_obj", None))
        return executor(x, timesteps, context, y, control, options, **kwargs)

    def _pool_level0(self, transformer_options) -> bool:
        """The opt-in pooled level-0 keys, except where only the exact per-token K/V layout works:
        beside a node that cuts K/V into tiles by token order (HyperTile, ToMe) or a second P3S
        injector (it extends the keys token by token, :func:`append_kv_slot`)."""
        if not self.pool_level0:
            return False
        patches = (transformer_options.get("patches") or {}).get("attn1_patch", ())
        blockers = [o for o in _other_attn1_patches(transformer_options) if "HyperTile" in o or "ToMe" in o]
        if sum(isinstance(p, P3SInjectorPatch) for p in patches) > 1:
            blockers.append("another P3S Condition Injector")
        if blockers and not self._warned_pooling:
            self._warned_pooling = True
            import logging

            logging.getLogger("P3S").warning(
                "[P3S Condition Injector] level0_keys 'pooled 2x2 (faster)' is not used beside %s: "
                "the exact keys are used instead", ", ".join(blockers))
        return not blockers

    def copy_features(self, x, timesteps, context, active=None):
        """Eq. 6 once per step: the copy on x_t + I'' (I'' fitted to x_t without stretching).

        ``reference_mode`` "one reference": reference ``reference_index`` only. "average copy
        features": the copy runs once per reference and its features are averaged (N times the
        copy's cost per step). With an ``active`` row mask (``cond only``) the copy runs on the
        active rows only (no layer reads the others' features); theirs are zeros of the right shape.
        With ``comfy_ops`` everything runs on ``x``'s device (the UNet's) in :meth:`compute_dtype`
        of ``x``'s dtype (the UNet's compute dtype), timesteps in fp32."""
        from ..encoder import aspects_differ, check_reference_index, prepare_reference

        net = self.compute_adapter()
        if self.comfy_ops:
            dev, dt = x.device, self.compute_dtype(x.dtype)
            t_dt = torch.float32
        else:
            p = next(net.parameters())
            dev, dt = p.device, p.dtype
            t_dt = dt
        want_map = self.feature_hook is not None
        rows = None
        if active is not None and not want_map and not bool(active.all()):
            rows = torch.nonzero(active.to(x.device)).flatten()
            full, x, timesteps, context = x.shape[0], x[rows], timesteps[rows], context[rows]
        xs, ts, cs = x.to(dev, dt), timesteps.to(dev, t_dt), context.to(dev, dt)
        i2 = self.i2
        if self.reference is not None:  # Eq. 4-5 on this step's device, in the compute dtype
            latent, hidden = self.reference
            i2 = net.encode_reference(latent.to(dev, dt), hidden.to(dev, dt), dtype=dt)
        if i2 is None:
            out = net.copy(xs, ts, cs, None, return_attn_map=want_map, dtype=dt, cross=self.cross)
        else:
            size = tuple(x.shape[-2:])
            self._warn_aspect(aspects_differ, size, tuple(i2.shape[-2:]))
            i2 = i2.to(dev, dt)
            if self.reference_mode == "one reference":
                indices = [check_reference_index(self.reference_index, int(i2.shape[0]))]
            else:
                indices = list(range(int(i2.shape[0])))
            out = None
            for i in indices:
                ref = prepare_reference(i2, x.shape[0], size, index=i)
                one = net.copy(xs, ts, cs, ref, return_attn_map=want_map, dtype=dt, cross=self.cross)
                if out is None:
                    out = dict(one)
                else:
                    for k in out:
                        out[k] = out[k] + one[k]
            if len(indices) > 1:
                out = {k: v / len(indices) for k, v in out.items()}
        if self.feature_hook is not None:
            self.feature_hook(out)
        if rows is not None:
            out = {key: f.new_zeros((full,) + tuple(f.shape[1:])).index_copy_(0, rows.to(f.device), f)
                   for key, f in out.items()}
        return out

    def _warn_aspect(self, aspects_differ, size, ref_hw) -> None:
        """Log once per generation size when a reference's aspect ratio differs from the latent's."""
        if size in self._warned_sizes:
            return
        self._warned_sizes.add(size)
        if aspects_differ(ref_hw, size):
            import logging

            logging.getLogger("P3S").warning(
                "[P3S Condition Injector] the reference (latent %dx%d, aspect %.3f) and the image "
                "being generated (latent %dx%d, aspect %.3f) differ in aspect ratio: the reference is "
                "scaled uniformly and its centre cropped to fit (never stretched); generate at the "
                "reference's aspect ratio to keep all of it", ref_hw[0], ref_hw[1],
                ref_hw[1] / ref_hw[0], size[0], size[1], size[1] / size[0])

    def __call__(self, n, context_attn1, value_attn1, extra_options):
        """Eq. 7 on this layer's K/V. Works from K/V (``context``/``value``), never from the queries
        ``n``, so a patch that merges (ToMe) or tiles (HyperTile) the queries before or after this
        one composes; K/V are laid out per token (:func:`interleave_slots`). A layer whose attention
        another node replaced (PAG, SAG: ``patches_replace``) is left to that node."""
        bank = extra_options.get(self.key)
        if bank is None:
            return n, context_attn1, value_attn1
        block = extra_options["block"]
        if bank.replaced and ((block[0], block[1], extra_options.get("block_index", 0)) in bank.replaced
                              or tuple(block) in bank.replaced):
            return n, context_attn1, value_attn1
        if bank.region is not None:
            return self._region_attn1(n, context_attn1, value_attn1, extra_options, bank)
        f = bank.features.get(_layer_key(extra_options))
        if f is None:
            return n, context_attn1, value_attn1
        slots = int(extra_options.get(KV_SLOTS, 1))
        ctx, val = context_attn1, value_attn1
        self._check_kv(ctx, val, slots, bank)
        tokens = ctx.shape[1] // slots
        if f.shape[0] != ctx.shape[0]:
            raise ModelMismatchError(
                "model", f"{self._others(bank)} changed the batch of self-attention's keys in "
                f"{_layer_key(extra_options)} ({f.shape[0]} -> {ctx.shape[0]} rows)",
                f"remove {self._others(bank)} from the MODEL path of this P3S Condition Injector")
        f = f.to(device=ctx.device, dtype=ctx.dtype)
        if f.shape[1] != tokens:
            resized = resize_tokens(f, tokens, extra_options.get("original_shape", ()))
            if resized is None:
                raise ModelMismatchError(
                    "model", f"self-attention in {_layer_key(extra_options)} has {tokens} key tokens, which is "
                    f"no token grid of this layer (the P3S feature has {f.shape[1]}); {self._others(bank)} "
                    "changed them", f"remove {self._others(bank)} from the MODEL path of this P3S Condition Injector")
            f = resized
        active = bank.active.to(ctx.device) if bank.active is not None else None
        pooled = None
        if bank.pool_level0 and slots == 1 and ctx is val and active is None \
                and _LEVEL.get(_layer_key(extra_options)) == 0:
            pooled = pooled_tokens(f, extra_options.get("original_shape", ()))
        if pooled is not None:
            # Opt-in (LEVEL0_KEYS): K' = [z, eps pool(f)], V' = [z + lam eps f, eps pool(f)].
            w = float(bank.weight)
            context = torch.cat([ctx, pooled * w], dim=1)
            value = torch.cat([torch.add(ctx, f, alpha=bank.lam * w), pooled * w], dim=1)
        elif slots == 1 and ctx is val:
            context, value = injected_context_value(ctx, f, bank.weight, bank.lam, active, interleaved=True)
            if context is ctx:  # nothing injected in any row: the plain attention, bit for bit
                return n, context_attn1, value_attn1
        else:
            # After a second injector or a patch that rewrote K/V per token (a hypernetwork).
            plain = None if active is None else ~active
            context, value = append_kv_slot(ctx, val, f * bank.weight, bank.lam, slots, plain)
        extra_options[KV_SLOTS] = slots + 1
        if bank.route is not None:
            bank.route.expect = (context.shape[0], context.shape[1])
        return n, context, value

    def cross_output(self, out, extra_options):
        """attn2 output patch: the cross-attention enhancement (Fig. 3, weighted by eps_t as Eq. 9;
        see :func:`~p3s_core.injection.enhanced_cross_output` for the form and why). It follows the
        attn2 patches and any attn2 replacement (IPAdapter-style nodes), chains with other attn2
        output patches, and with a region adds only inside it (scaled by the region's weights)."""
        bank = extra_options.get(self.key)
        if bank is None:
            return out
        key = _layer_key(extra_options)
        g = bank.features.get(cross_key(key))
        if g is None:
            return out
        if g.shape[0] != out.shape[0]:
            raise ModelMismatchError(
                "model", f"another node changed the batch of cross-attention in {key} ({g.shape[0]} -> "
                f"{out.shape[0]} rows)", "remove that node from the MODEL path of this P3S Condition Injector")
        g = g.to(device=out.device, dtype=out.dtype)
        shape = extra_options.get("original_shape", ())
        if g.shape[1] != out.shape[1]:
            g = resize_tokens(g, out.shape[1], shape)
            if g is None:
                raise ModelMismatchError(
                    "model", f"cross-attention in {key} has {out.shape[1]} tokens, which is no token grid of "
                    "this layer", "remove the node that changes the UNet's internal resolution")
        tokens = None
        if bank.region is not None:
            grid = token_grid(out.shape[1], shape)
            if grid is None:
                raise ModelMismatchError(
                    "model", f"cannot place the region on a cross-attention layer of {out.shape[1]} tokens",
                    "remove the node that changes the UNet's internal resolution, or drop the region")
            tokens = bank.region.region.weights(grid, device=out.device, dtype=out.dtype)
        active = bank.active.to(out.device) if bank.active is not None else None
        return enhanced_cross_output(out, g, bank.weight, active, tokens)

    @staticmethod
    def _others(bank) -> str:
        return ", ".join(bank.others) if bank.others else "another node's self-attention patch"

    def _check_kv(self, ctx, val, slots, bank):
        if ctx.dim() != 3 or val.dim() != 3 or ctx.shape[:2] != val.shape[:2] or ctx.shape[1] % slots:
            raise ModelMismatchError(
                "model", f"{self._others(bank)} gave self-attention keys {tuple(ctx.shape)} and values "
                f"{tuple(val.shape)} that P3S cannot extend",
                f"remove {self._others(bank)} from the MODEL path of this P3S Condition Injector")


def apply_injector(model, adapter, i2, schedule, lam=DEFAULT_LAMBDA, strength=1.0,
                   apply_to="cond and uncond", feature_hook=None, reference_index=0,
                   reference_mode="one reference", region: Region | None = None,
                   level0_keys: str = LEVEL0_KEYS[0], reference=None, copy_precision: str = COPY_PRECISIONS[0],
                   cross_attention: str = CROSS_ATTENTION[0]):
    """A ``model.clone()`` with the P3S attn1 patch, the attn2 output patch of the cross-attention
    enhancement (when the adapter has it and ``cross_attention`` is not "off") and the per-step
    wrapper installed (chaining-safe). ``reference``, ``copy_precision``: see :class:`P3SInjectorPatch`."""
    import comfy.patcher_extension as pe

    check_sd15(model)
    m = model.clone()
    patch = P3SInjectorPatch(adapter, i2, schedule, lam=lam, strength=strength, apply_to=apply_to,
                             model_sampling=m.get_model_object("model_sampling"), feature_hook=feature_hook,
                             reference_index=reference_index, reference_mode=reference_mode,
                             region=region, level0_keys=level0_keys, reference=reference,
                             copy_precision=copy_precision, cross_attention=cross_attention)
    if patch.strength == 0.0 and feature_hook is None:
        # Speed: weight 0 everywhere is the plain model; install nothing (no per-layer patch
        # call, no wrapper, the adapter is not loaded with the model).
        return m, patch
    m.set_model_attn1_patch(patch)
    if region is not None:
        m.set_model_attn1_output_patch(patch.region_output)
    if patch.cross:
        m.set_model_attn2_output_patch(patch.cross_output)
    m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, patch.key, patch.diffusion_wrapper)
    m.set_additional_models(patch.key, [patch.adapter_patcher()])
    return m, patch
