"""The adapter carries its cleaned reference(s) (issue 12): saved, loaded, checked; old files load."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from p3s_core.adapter import load_adapter, new_adapter, save_adapter
from p3s_core.copy_unet import CopyUNetConfig
from p3s_core.errors import AdapterFileError
from p3s_core.safe_io import read_safetensors_header

TINY = CopyUNetConfig.tiny()
ENC = dict(clip_dim=16, encoder_inner_dim=8)


def _adapter_with_reference(n=2):
    a = new_adapter(TINY, seed=3, **ENC)
    g = torch.Generator().manual_seed(5)
    a.reference = {"latent": torch.randn(n, TINY.in_channels, 6, 8, generator=g),
                   "clip_hidden": torch.randn(n, 5, 16, generator=g)}
    return a


def test_reference_round_trip_and_same_bytes(tmp_path):
    a = _adapter_with_reference()
    p1, p2 = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_adapter(a, p1)
    save_adapter(a, p2)
    assert p1.read_bytes() == p2.read_bytes()
    _, infos = read_safetensors_header(p1)
    assert tuple(infos["reference.latent"]["shape"]) == (2, TINY.in_channels, 6, 8)
    loaded = load_adapter(p1)
    for k in ("latent", "clip_hidden"):
        assert torch.equal(loaded.reference[k], a.reference[k])
    sd = loaded.state_dict()
    assert not any(k.startswith("reference.") for k in sd)  # not weights: the state dict is unchanged


def test_old_files_without_a_reference_still_load(tmp_path):
    a = new_adapter(TINY, seed=3, **ENC)
    path = tmp_path / "old.safetensors"
    save_adapter(a, path)
    _, infos = read_safetensors_header(path)
    assert not any(k.startswith("reference.") for k in infos)
    loaded = load_adapter(path)
    assert loaded.reference is None


@pytest.mark.parametrize("case", ["only_latent", "wrong_channels", "count_mismatch", "unknown_name"])
def test_damaged_stored_reference_is_refused(tmp_path, case):
    a = _adapter_with_reference()
    good = tmp_path / "good.safetensors"
    save_adapter(a, good)
    meta, _ = read_safetensors_header(good)
    sd = load_file(str(good))
    if case == "only_latent":
        del sd["reference.clip_hidden"]
    elif case == "wrong_channels":
        sd["reference.latent"] = torch.zeros(2, TINY.in_channels + 1, 6, 8)
    elif case == "count_mismatch":
        sd["reference.clip_hidden"] = torch.zeros(3, 5, 16)
    else:
        sd["reference.extra"] = torch.zeros(1)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad), metadata=meta)
    with pytest.raises(AdapterFileError, match="stored reference") as err:
        load_adapter(bad)
    assert "Fix:" in str(err.value)
