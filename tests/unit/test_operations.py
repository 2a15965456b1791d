"""Layer families of the copy and the encoder (issue 21.1-2): ``operations`` threaded through
P3SAdapter / new_adapter / load_adapter; twins share the parameters; CastOps computes in the input's
dtype; the diffusers injector runs the copy in the UNet's dtype by default, in fp32 on request."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from p3s_core.adapter import load_adapter, new_adapter, save_adapter
from p3s_core.copy_unet import CopyUNetConfig
from p3s_core.errors import ModelMismatchError
from p3s_core.operations import OPERATION_NAMES, CastOps, TorchOps, check_operations

TINY = CopyUNetConfig.tiny()


def _adapter(seed=0):
    a = new_adapter(TINY, seed=seed, clip_dim=16, encoder_inner_dim=8)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for conv in list(a.copy.zero_convs.values()) + [a.encoder.zero_conv]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.2)
    return a.eval()


def _inputs(batch=2):
    g = torch.Generator().manual_seed(5)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([400.0] * batch),
            torch.randn(batch, 6, TINY.context_dim, generator=g), torch.randn(1, 4, 8, 8, generator=g),
            torch.randn(1, 9, 16, generator=g))


def _weighted_layers(module):
    return [(n, m) for n, m in module.named_modules() if any(True for _ in m.parameters(recurse=False))]


def test_every_weighted_layer_comes_from_the_family():
    a = _adapter()
    twin = a.with_operations(CastOps)
    layers = _weighted_layers(twin)
    assert len(layers) == len(_weighted_layers(a)) > 50
    cast_types = tuple(getattr(CastOps, n) for n in OPERATION_NAMES)
    assert all(isinstance(m, cast_types) for _, m in layers)
    assert not any(isinstance(m, cast_types) for _, m in _weighted_layers(a))
    assert a.operations is TorchOps and twin.operations is CastOps and a.with_operations(nn) is a
    assert a.with_operations(None) is a and a.with_operations(TorchOps) is a


def test_adapters_and_twins_survive_deepcopy():
    import copy

    a = _adapter()
    twin = a.with_operations(CastOps)
    for m in (a, twin):
        c = copy.deepcopy(m)
        assert c.operations is m.operations
        assert all(torch.equal(x, y) for x, y in zip(c.parameters(), m.parameters()))


def test_the_twin_shares_the_parameters_and_flags_and_computes_the_same():
    a = _adapter()
    a.encoder.to_q.weight.requires_grad_(False)
    twin = a.with_operations(CastOps)
    mine, theirs = dict(a.named_parameters()), dict(twin.named_parameters())
    assert mine.keys() == theirs.keys() and all(theirs[k] is p for k, p in mine.items())
    assert not a.encoder.to_q.weight.requires_grad and a.copy.conv_in.weight.requires_grad  # flags kept
    assert twin.lam == a.lam and twin.reference is a.reference and not twin.training
    x, t, c, lat, hid = _inputs()
    with torch.no_grad():
        i2, i2_twin = a.encode_reference(lat, hid), twin.encode_reference(lat, hid)
        ref = i2.expand(2, -1, -1, -1)
        out, out_twin = a(x, t, c, ref), twin(x, t, c, ref)
    assert torch.equal(i2, i2_twin)
    for k in out:
        assert torch.equal(out[k], out_twin[k]), k
    # training through the twin reaches the adapter's own parameters
    loss = sum(v.square().mean() for v in twin(x, t, c, ref).values())
    loss.backward()
    assert a.copy.zero_convs["input_1"].weight.grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_ops_compute_in_the_given_dtype_with_fp32_weights(dtype):
    a = _adapter()
    twin = a.with_operations(CastOps)
    seen = set()
    handles = [m.register_forward_hook(lambda m, i, o: seen.add(o.dtype)) for _, m in _weighted_layers(twin)]
    x, t, c, lat, hid = _inputs()
    with torch.no_grad():
        i2 = twin.encode_reference(lat.to(dtype), hid.to(dtype), dtype=dtype)
        half = twin(x.to(dtype), t, c.to(dtype), i2.expand(2, -1, -1, -1), dtype=dtype)
        full = a(x, t, c, a.encode_reference(lat, hid).expand(2, -1, -1, -1))
    for h in handles:
        h.remove()
    assert seen == {dtype} and i2.dtype == dtype
    assert {p.dtype for p in a.parameters()} == {torch.float32}
    for k in full:
        assert half[k].dtype == dtype
        err = float((half[k].float() - full[k]).abs().max())
        assert err < 0.05 * float(full[k].abs().max()) + 1e-3, (k, err)
    with pytest.raises(RuntimeError):  # the plain layers cannot: why the family is needed
        with torch.no_grad():
            a(x.to(dtype), t, c.to(dtype), None, dtype=dtype)


def test_new_and_load_adapter_take_the_family(tmp_path):
    a = _adapter()
    path = save_adapter(a, tmp_path / "a.safetensors")
    loaded = load_adapter(path, operations=CastOps)
    assert loaded.operations is CastOps and isinstance(loaded.copy.conv_in, CastOps.Conv2d)
    for k, v in a.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    fresh = new_adapter(TINY, seed=0, clip_dim=16, encoder_inner_dim=8, operations=CastOps)
    plain = new_adapter(TINY, seed=0, clip_dim=16, encoder_inner_dim=8)
    assert isinstance(fresh.encoder.to_k, CastOps.Linear)
    for k, v in plain.state_dict().items():  # initialised by torch.nn, whatever the family
        assert torch.equal(fresh.state_dict()[k], v), k


def test_a_family_without_a_layer_is_refused():
    class NoNorms:
        Linear, Conv2d = nn.Linear, nn.Conv2d

    with pytest.raises(ModelMismatchError, match="GroupNorm, LayerNorm"):
        check_operations(NoNorms)
    with pytest.raises(ModelMismatchError, match="operations"):
        new_adapter(TINY, seed=0, clip_dim=16, operations=NoNorms)


@pytest.mark.parametrize("unet_dtype, precision, expect", [
    (torch.bfloat16, "same as the UNet", torch.bfloat16), (torch.bfloat16, "fp32", torch.float32),
    (torch.float32, "same as the UNet", torch.float32), (torch.float32, "bf16", torch.bfloat16)])
def test_the_diffusers_injector_runs_the_copy_in_the_unets_dtype_or_fp32(unet_dtype, precision, expect):
    from test_diffusers_engine import active_adapter, inputs, tiny_unet

    from p3s_core import diffusers_engine as db

    unet = tiny_unet().to(unet_dtype)
    adapter = active_adapter(tiny_unet())
    x, t, ctx = inputs()
    inj = db.P3SDiffusersInjector(unet, adapter, copy_precision=precision)
    seen = set()
    with torch.no_grad():
        feats = inj.copy_features(x.to(unet_dtype), t, ctx.to(unet_dtype))
        twin = inj._twin
        handles = [m.register_forward_hook(lambda m, i, o: seen.add(o.dtype)) for _, m in _weighted_layers(twin.copy)]
        inj.copy_features(x.to(unet_dtype), t, ctx.to(unet_dtype))
        for h in handles:
            h.remove()
        with inj:
            out = unet(x.to(unet_dtype), t, encoder_hidden_states=ctx.to(unet_dtype)).sample
    assert seen == {expect} and {f.dtype for f in feats.values()} == {expect}
    assert {p.dtype for p in adapter.parameters()} == {torch.float32}
    assert bool(torch.isfinite(out).all())
    with pytest.raises(Exception, match="copy_precision"):
        db.P3SDiffusersInjector(unet, adapter, copy_precision="fp8")
