"""The ComfyUI engine: regional injection (issue 16; the math and the reasons are in ``region.py``)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import ModelMismatchError
from ..injection import token_grid
from ..region import Region, blend_tokens


class RegionalInjection:
    """The regional half of :class:`~.injector.P3SInjectorPatch` (a mixin): Eq. 7 computed for the
    region's tokens only and blended into the plain attention output by the region's weights."""

    def _region_attn1(self, n, context_attn1, value_attn1, extra_options, bank):
        """Leave K/V as they came (the model computes its plain attention for every query) and hand
        the inside tokens' injected K/V to :meth:`region_output` through ``extra_options``."""
        grid = token_grid(n.shape[1], extra_options.get("original_shape", ()))
        if grid is None:
            raise ModelMismatchError(
                "model", f"cannot place the region on a self-attention layer of {n.shape[1]} tokens",
                "remove the node that changes the UNet's internal resolution, or drop the region")
        w = bank.region.region.weights(grid, device=n.device, dtype=n.dtype)
        if not bool((w > 0).any()):
            return n, context_attn1, value_attn1
        options = dict(extra_options)
        options[self.key] = replace(bank, region=None)
        _, context, value = self(n, context_attn1, value_attn1, options)  # the unmasked Eq. 7 K/V
        if context is context_attn1 and value is value_attn1:  # nothing injected at this layer
            return n, context_attn1, value_attn1
        extra_options[self.key + ":region"] = (n, context, value, w, bank)
        return n, context_attn1, value_attn1

    def region_output(self, out, extra_options):
        """attn1 output patch: ``w * A_inj + (1 - w) * A`` on the region's tokens (region.py)."""
        stash = extra_options.pop(self.key + ":region", None)
        if stash is None:
            return out
        n, context, value, w, bank = stash
        index = (w > 0).nonzero().flatten()
        rows = bank.active.to(out.device) if bank.active is not None else None
        if rows is not None and bool(rows.all()):
            rows = None
        if rows is not None:
            n, context, value = n[rows], context[rows], value[rows]
        attn1 = bank.region.attn1(extra_options)
        injected = attn1(n[:, index], context=context, value=value, transformer_options=extra_options)
        return blend_tokens(out, injected, index, w[index], rows)


@dataclass
class RegionRun:
    """A region plus the UNet of this step (to find each layer's own ``attn1`` module)."""
    region: Region
    unet: object

    def attn1(self, extra_options):
        block = extra_options["block"]
        unet = self.unet
        if unet is None:
            raise ModelMismatchError("model", "the UNet was not reachable from the P3S wrapper",
                                     "apply the region on an SD1.5 MODEL from Load Checkpoint")
        seq = unet.middle_block if block[0] == "middle" else \
            (unet.input_blocks if block[0] == "input" else unet.output_blocks)[block[1]]
        for layer in seq:
            blocks = getattr(layer, "transformer_blocks", None)
            if blocks is not None:
                return blocks[extra_options.get("block_index", 0)].attn1
        raise ModelMismatchError("model", f"no self-attention found in UNet block {block}",
                                 "apply the region on an SD1.5 MODEL from Load Checkpoint")
