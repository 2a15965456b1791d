"""Write tests/data/adapter_v1_tiny.safetensors and its expected outputs (issue 22).

Run ONCE with the pack as it was before format 2 (commit 2b11c9f of main) on its PYTHONPATH:
the file is a format-1 adapter written by that code, and ``adapter_v1_tiny_expected.safetensors``
holds what that code computed with it (the copy's features, I'', the diffusers UNet output with
the injector, one ComfyUI-form self-attention K/V). tests/unit/test_adapter_format.py loads the file
with today's code and compares bit for bit. Usage:
    PYTHONPATH=<old pack root> python scripts/make_v1_fixture.py <out folder>
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import tiny_sd  # noqa: E402


def tiny_unet(seed=0):
    """A tiny diffusers UNet with the SD1.5 structure (widths 8/16/32/32, context 16: a small file)."""
    return tiny_sd.tiny_unet(seed, widths=(8, 16, 32, 32), groups=4, context=16)


def fixture_inputs():
    g = torch.Generator().manual_seed(22)
    return {"x": torch.randn(2, 4, 8, 8, generator=g), "t": torch.tensor([500.0, 500.0]),
            "ctx": torch.randn(2, 7, 16, generator=g), "ref_latent": torch.randn(1, 4, 8, 8, generator=g),
            "ref_hidden": torch.randn(1, 5, 16, generator=g)}


def expected_outputs(adapter, unet) -> dict:
    from p3s_core import diffusers_engine as db
    from p3s_core.injection import injected_context_value

    inp = fixture_inputs()
    out = {}
    with torch.no_grad():
        i2 = adapter.encode_reference(inp["ref_latent"], inp["ref_hidden"])
        out["i2"] = i2
        feats = adapter.copy(inp["x"], inp["t"], inp["ctx"], i2.expand(2, -1, -1, -1))
        out.update({f"feature.{k}": v.contiguous() for k, v in feats.items()})
        z = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(5))
        c, v = injected_context_value(z, feats["input_1"], 0.7, adapter.lam, interleaved=True)
        out["attn1.context"], out["attn1.value"] = c, v
        with db.P3SDiffusersInjector(unet, adapter, i2, None, strength=0.8):
            out["unet"] = unet(inp["x"], inp["t"][0], encoder_hidden_states=inp["ctx"]).sample
    return {k: v.detach().contiguous() for k, v in out.items()}


def main(folder: str) -> None:
    from p3s_core import diffusers_engine as db
    from p3s_core.adapter import FORMAT_VERSION, save_adapter

    assert FORMAT_VERSION == 1, "run this with the pack before format 2"
    torch.set_num_threads(1)
    unet = tiny_unet()
    adapter = db.new_adapter_for_unet(unet, seed=0, config=db.copy_config_for(unet), clip_dim=16, encoder_inner_dim=8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # an adapter that acts: the zero convs trained to something
        for conv in list(adapter.copy.zero_convs.values()) + [adapter.encoder.zero_conv]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.2)
    adapter.eval().requires_grad_(False)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_adapter(adapter, folder / "adapter_v1_tiny.safetensors")
    save_file(expected_outputs(adapter, unet), str(folder / "adapter_v1_tiny_expected.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
