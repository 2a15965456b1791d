"""The injector's reference handling on a tiny adapter (issue 12): one reference by index, the
feature-average mode, no stretching, a warning when aspects differ. The real-path versions are in
tests/integration/test_fidelity.py."""
from __future__ import annotations

import logging

import pytest
import torch

from p3s_core.adapter import new_adapter
from p3s_core.comfyui_engine import P3SInjectorPatch
from p3s_core.copy_unet import CopyUNetConfig
from p3s_core.encoder import fit_reference

TINY = CopyUNetConfig.tiny()


@pytest.fixture(scope="module")
def adapter():
    a = new_adapter(TINY, seed=0, clip_dim=16, encoder_inner_dim=8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for conv in a.copy.zero_convs.values():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.1)
    return a.eval().requires_grad_(False)


def _inputs(h=8, w=8, batch=2):
    g = torch.Generator().manual_seed(2)
    return (torch.randn(batch, 4, h, w, generator=g), torch.tensor([400.0] * batch),
            torch.randn(batch, 6, TINY.context_dim, generator=g))


def _copy_inputs(adapter, patch, x, t, c):
    seen = []
    h = adapter.copy.register_forward_pre_hook(lambda m, a, k: seen.append(a[3].clone()), with_kwargs=True)
    try:
        with torch.no_grad():
            feats = patch.copy_features(x, t, c)
    finally:
        h.remove()
    return feats, seen


def test_one_reference_by_index_and_feature_average(adapter):
    g = torch.Generator().manual_seed(3)
    i2 = torch.randn(3, 4, 8, 8, generator=g)
    x, t, c = _inputs()
    singles = []
    for i in range(3):
        feats, seen = _copy_inputs(adapter, P3SInjectorPatch(adapter, i2, None, comfy_ops=False, reference_index=i), x, t, c)
        assert len(seen) == 1 and all(torch.equal(row, i2[i]) for row in seen[0])
        singles.append(feats)
    avg, seen = _copy_inputs(adapter, P3SInjectorPatch(adapter, i2, None, comfy_ops=False, reference_mode="average copy features"),
                             x, t, c)
    assert len(seen) == 3  # one copy run per reference
    for k in avg:
        torch.testing.assert_close(avg[k], sum(s[k] for s in singles) / 3, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError):
        P3SInjectorPatch(adapter, i2, None, comfy_ops=False, reference_mode="latent average")


def test_a_wide_reference_is_fitted_not_stretched_and_a_warning_says_so(adapter, caplog):
    g = torch.Generator().manual_seed(4)
    i2 = torch.randn(1, 4, 6, 8, generator=g)  # 4:3, like 512x384
    x, t, c = _inputs(8, 8)
    patch = P3SInjectorPatch(adapter, i2, None, comfy_ops=False)
    with caplog.at_level(logging.WARNING, logger="P3S"):
        _, seen = _copy_inputs(adapter, patch, x, t, c)
        _copy_inputs(adapter, patch, x, t, c)
    assert torch.equal(seen[0][0], fit_reference(i2, (8, 8))[0])
    warnings = [r for r in caplog.records if "aspect" in r.getMessage()]
    assert len(warnings) == 1  # once per generation size
    caplog.clear()
    same = P3SInjectorPatch(adapter, torch.randn(1, 4, 4, 4, generator=g), None, comfy_ops=False)
    with caplog.at_level(logging.WARNING, logger="P3S"):
        _copy_inputs(adapter, same, x, t, c)
    assert not [r for r in caplog.records if "aspect" in r.getMessage()]
