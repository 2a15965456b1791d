"""The adapter file: safetensors round trip, determinism, refusals, atomic save, safe header reads."""
from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from p3s_core import safe_io
from p3s_core.adapter import (BASE_FAMILY, FORMAT_VERSION, P3SAdapter, adapter_metadata,
                              load_adapter, new_adapter, save_adapter, unet_fingerprint)
from p3s_core.copy_init import ldm_key_map
from p3s_core.copy_unet import CopyUNetConfig, layer_map
from p3s_core.errors import AdapterFileError
from p3s_core.safe_io import atomic_save_safetensors, read_safetensors_header

TINY = CopyUNetConfig.tiny()
ENC = dict(clip_dim=16, encoder_inner_dim=8)

UNPICKLED: list[str] = []


def _mark_unpickled():
    UNPICKLED.append("unpickled")
    return "boom"


class _Trap:
    """Unpickling this object calls _mark_unpickled: the test sees whether anything unpickled."""

    def __reduce__(self):
        return (_mark_unpickled, ())


def _tiny(seed=1) -> P3SAdapter:
    a = new_adapter(TINY, seed=seed, **ENC)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # make every tensor non-trivial so the round trip is meaningful
        for conv in list(a.copy.zero_convs.values()) + [a.encoder.zero_conv]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g))
    a.training_info = {"steps": 120, "lr": 1e-5, "prompt": "a photo of sks dog", "gamma": 0.1}
    a.lam = 0.3
    a.base_unet_hash = "p3sfp1:abc"
    return a


@pytest.fixture(scope="module")
def tiny_adapter():
    return _tiny()


@pytest.fixture(scope="module")
def saved(tiny_adapter, tmp_path_factory):
    path = tmp_path_factory.mktemp("adapter") / "sks.safetensors"
    save_adapter(tiny_adapter, path, extra_metadata={"note": "hello"})
    return path


def _rewrite(src: Path, dst: Path, *, meta_update=None, drop=(), add=None, reshape=None):
    """Re-save ``src`` with edited metadata / tensors (a plain safetensors writer)."""
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(src))
    meta.update(meta_update or {})
    for k in drop:
        del tensors[k]
    tensors.update(add or {})
    for k, shape in (reshape or {}).items():
        tensors[k] = torch.zeros(shape)
    save_file(tensors, str(dst), metadata=meta)
    return dst


# --------------------------------------------------------------------------- round trip


def test_save_load_round_trip_is_exact(tiny_adapter, saved):
    loaded = load_adapter(saved)
    assert isinstance(loaded, P3SAdapter) and not loaded.training
    ref = tiny_adapter.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k
        assert got[k].device.type == "cpu"
        # ordinary owned memory, aligned like any tensor torch allocates: the CPU picks the same
        # kernels for the loaded and the original adapter (views into a file map at odd offsets
        # once gave ~1e-5 differences on another CPU)
        assert got[k].data_ptr() % 64 == 0 and got[k].storage_offset() == 0, k
        assert got[k].untyped_storage().nbytes() == got[k].numel() * got[k].element_size(), k
    assert loaded.config == TINY
    assert loaded.lam == 0.3
    assert loaded.training_info == tiny_adapter.training_info
    assert loaded.base_unet_hash == "p3sfp1:abc"
    assert loaded.layer_map == layer_map(TINY)
    assert loaded.encoder_config == {"latent_channels": 4, "clip_dim": 16, "inner_dim": 8}
    # the loaded model computes the same features (bit-identical: both in ordinary aligned memory)
    x, ctx = torch.randn(1, 4, 4, 4), torch.randn(1, 3, 32)
    with torch.no_grad():
        a, b = tiny_adapter.eval()(x, torch.tensor([9.0]), ctx), loaded(x, torch.tensor([9.0]), ctx)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _mapped_files() -> str:
    try:
        return Path("/proc/self/maps").read_text()
    except OSError:  # not Linux: the in-place overwrite below still proves ownership
        return ""


def test_loaded_adapter_owns_aligned_memory_and_keeps_no_file_mapping(tiny_adapter, saved, tmp_path):
    """Each parameter is its own 64-byte-aligned allocation (not a view into the file at some
    offset), no mapping of the file stays, and overwriting / deleting the file changes nothing."""
    path = tmp_path / "owned.safetensors"
    path.write_bytes(saved.read_bytes())
    loaded = load_adapter(path)
    tensors = dict(loaded.state_dict())
    assert len(tensors) == len(tiny_adapter.state_dict()) > 100
    storages = set()
    for k, t in tensors.items():
        assert t.data_ptr() % 64 == 0, f"{k} is not 64-byte aligned"
        assert t.storage_offset() == 0, k
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), f"{k} shares a larger buffer"
        storages.add(t.untyped_storage().data_ptr())
    assert len(storages) == len(tensors), "parameters share one buffer"
    assert str(path) not in _mapped_files(), "the file is still memory-mapped"
    ref = {k: v.clone() for k, v in tensors.items()}
    with open(path, "r+b") as fh:  # overwrite the tensor bytes in place, then delete the file
        fh.seek(4096)
        fh.write(b"\xff" * (path.stat().st_size - 4096))
    path.unlink()
    for k, t in loaded.state_dict().items():
        assert torch.equal(t, ref[k]) and torch.equal(t, tiny_adapter.state_dict()[k]), k


def test_loaded_adapter_moves_to_the_requested_dtype(saved):
    half = load_adapter(saved, dtype=torch.float16)
    assert {t.dtype for t in half.state_dict().values()} == {torch.float16}
    assert all(t.data_ptr() % 64 == 0 for t in half.state_dict().values())


# --------------------------------------------------------------------------- non-finite weights


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_file_with_non_finite_weights_is_refused(saved, tmp_path, value):
    with safe_open(str(saved), "pt") as f:
        good = f.get_tensor("copy.zero_convs.middle_0.weight")
    bad = good.clone()
    bad.view(-1)[3] = value
    p = _rewrite(saved, tmp_path / "nan.safetensors", add={"copy.zero_convs.middle_0.weight": bad})
    with pytest.raises(AdapterFileError, match=r"NaN or infinite weights in 1 tensors: copy\.zero_convs\.middle_0\.weight") as ei:
        load_adapter(p)
    msg = str(ei.value)
    assert str(p) in msg and "lower learning_rate" in msg


def test_adapter_with_non_finite_weights_is_not_saved(tmp_path):
    a = _tiny(seed=3)
    path = tmp_path / "diverged.safetensors"
    save_adapter(a, path)
    before = path.read_bytes()
    with torch.no_grad():
        a.encoder.to_q.weight[0, 0] = float("nan")
    with pytest.raises(AdapterFileError, match=r"NaN or infinite weights .*encoder\.to_q\.weight") as ei:
        save_adapter(a, path)
    assert "do not save it" in str(ei.value)
    assert path.read_bytes() == before and _tmp_files(tmp_path) == []


# --------------------------------------------------------------------------- the fault is named


def test_header_length_starting_with_0x80_is_not_called_a_pickle(tiny_adapter, tmp_path):
    """A valid file whose header length happens to start with byte 0x80 loads (it was once
    reported as a pickle)."""
    for pad in range(0, 512):
        p = save_adapter(tiny_adapter, tmp_path / "x80.safetensors", extra_metadata={"pad": "p" * pad})
        if p.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no padding gave a header length starting with 0x80")
    assert load_adapter(p).lam == tiny_adapter.lam


def test_corrupted_metadata_is_named_as_such(saved, tmp_path):
    raw = bytearray(saved.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = bytes(raw[8:8 + n])
    at = header.index(b'"config":"') + len(b'"config":"') + 3
    cases = {"bad_utf8": (at, b"\xff"), "broken_json": (header.index(b'"__metadata__":') + len(b'"__metadata__"'), b";")}
    for label, (pos, byte) in cases.items():
        bad = bytearray(raw)
        bad[8 + pos:8 + pos + 1] = byte
        p = tmp_path / f"{label}.safetensors"
        p.write_bytes(bytes(bad))
        with pytest.raises(AdapterFileError, match="header .* is corrupted") as ei:
            load_adapter(p)
        assert "pickle" not in str(ei.value) and "truncated" not in str(ei.value), label
    # a metadata value that is valid JSON but not the P3S config
    p = _rewrite(saved, tmp_path / "cfg.safetensors", meta_update={"config": '{"model_channels": "x"}'})
    with pytest.raises(AdapterFileError, match="metadata entry 'config' is corrupted"):
        load_adapter(p)
    p = _rewrite(saved, tmp_path / "cfg2.safetensors", meta_update={"config": '{"model_chan'})
    with pytest.raises(AdapterFileError, match=r"metadata entry 'config' is corrupted \(not valid JSON\)"):
        load_adapter(p)
    # truncation is named as truncation, a pickle as a pickle (see the tests above)


def test_file_layout_is_plain_safetensors_with_p3s_metadata(tiny_adapter, saved):
    tensors = load_file(str(saved))  # any safetensors reader (e.g. a diffusers pipeline)
    assert all(k.startswith(("encoder.", "copy.")) for k in tensors)
    assert "copy.zero_convs.output_11.weight" in tensors
    assert "copy.levels.0.st.transformer_blocks.0.attn1.to_q.weight" in tensors
    assert "encoder.zero_conv.weight" in tensors
    with safe_open(str(saved), "pt") as f:
        meta = f.metadata()
    assert meta["p3s_format_version"] == str(FORMAT_VERSION) == "2"
    assert meta["enhancement"] == tiny_adapter.enhancement and meta["copy_layout"] == "encoder"
    assert meta["base_family"] == BASE_FAMILY == "sd15"
    assert json.loads(meta["config"]) == TINY.to_dict()
    assert json.loads(meta["layer_map"]) == layer_map(TINY)
    assert float(meta["lambda"]) == 0.3
    assert json.loads(meta["training"])["steps"] == 120
    assert meta["base_unet_hash"] == "p3sfp1:abc"
    assert meta["note"] == "hello"
    assert adapter_metadata(tiny_adapter).items() <= meta.items()
    header_meta, names = read_safetensors_header(saved)
    assert header_meta == meta and set(names) == set(tensors)


def test_same_seed_gives_the_same_bytes(tmp_path):
    paths = []
    for i, seed in enumerate((7, 7, 8)):
        paths.append(save_adapter(new_adapter(TINY, seed=seed, **ENC), tmp_path / f"{i}.safetensors"))
    data = [p.read_bytes() for p in paths]
    assert data[0] == data[1]
    assert data[0] != data[2]


def test_new_adapter_from_base_unet_is_deterministic_and_leaves_the_global_rng(tmp_path):
    torch.manual_seed(5)
    src = new_adapter(TINY, seed=99, **ENC)  # a random stand-in for a base UNet
    unet = {ldm: src.copy.state_dict()[ck].clone()
            for ck, ldm in ldm_key_map(src.copy, "model.diffusion_model.").items()}
    state = torch.get_rng_state()
    a = new_adapter(TINY, unet, seed=3, unet_prefix="model.diffusion_model.", **ENC)
    assert torch.equal(torch.get_rng_state(), state)
    b = new_adapter(TINY, unet, seed=3, unet_prefix="model.diffusion_model.", **ENC)
    plain = new_adapter(TINY, seed=3, **ENC)
    for k, v in a.copy.state_dict().items():
        if k.startswith("zero_convs."):
            assert torch.count_nonzero(v) == 0
        else:
            assert torch.equal(v, src.copy.state_dict()[k]), k
    for k, v in a.encoder.state_dict().items():  # the encoder depends on the seed only
        assert torch.equal(v, b.encoder.state_dict()[k]) and torch.equal(v, plain.encoder.state_dict()[k])
    assert a.base_unet_hash and a.base_unet_hash.startswith("p3sfp1:")
    assert a.base_unet_hash == b.base_unet_hash
    assert a.base_unet_hash == unet_fingerprint(unet)
    other = dict(unet)
    k0 = "model.diffusion_model.input_blocks.0.0.weight"
    other[k0] = other[k0] + 1.0
    assert unet_fingerprint(other) != a.base_unet_hash
    assert save_adapter(a, tmp_path / "a.safetensors").read_bytes() == \
        save_adapter(b, tmp_path / "b.safetensors").read_bytes()


def test_reserved_extra_metadata_is_refused(tiny_adapter, tmp_path):
    with pytest.raises(AdapterFileError, match="reserved"):
        save_adapter(tiny_adapter, tmp_path / "x.safetensors", {"base_family": "sdxl"})
    assert not (tmp_path / "x.safetensors").exists()


# --------------------------------------------------------------------------- refusals


def test_truncated_file_is_refused(saved, tmp_path):
    data = saved.read_bytes()
    for cut in (4, 40, len(data) // 2, len(data) - 1):
        p = tmp_path / f"cut{cut}.safetensors"
        p.write_bytes(data[:cut])
        with pytest.raises(AdapterFileError, match="truncated"):
            load_adapter(p)


def test_random_bytes_are_refused(tmp_path):
    rng = random.Random(0)
    for i in range(5):
        p = tmp_path / f"rand{i}.safetensors"
        p.write_bytes(bytes(rng.getrandbits(8) for _ in range(2048)))
        with pytest.raises(AdapterFileError):
            load_adapter(p)
    p = tmp_path / "json_garbage.safetensors"
    body = b"not json at all!"
    p.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(AdapterFileError, match="not a safetensors file .*does not start with a JSON object"):
        load_adapter(p)


@pytest.mark.parametrize("zipfile", [True, False])
def test_pickle_file_is_refused_without_unpickling(tmp_path, zipfile):
    p = tmp_path / "evil.safetensors"
    torch.save({"encoder.zero_conv.weight": torch.zeros(1), "trap": _Trap()}, p,
               _use_new_zipfile_serialization=zipfile)
    UNPICKLED.clear()
    with pytest.raises(AdapterFileError, match="pickle"):
        load_adapter(p)
    with pytest.raises(AdapterFileError, match="never unpickles"):
        read_safetensors_header(p)
    assert UNPICKLED == []


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(AdapterFileError, match="does not exist"):
        load_adapter(tmp_path / "nope.safetensors")


def test_other_base_family_is_refused(saved, tmp_path):
    p = _rewrite(saved, tmp_path / "xl.safetensors", meta_update={"base_family": "sdxl"})
    with pytest.raises(AdapterFileError, match=r"'sdxl'.*SD1\.5"):
        load_adapter(p)


def test_newer_format_is_refused(saved, tmp_path):
    p = _rewrite(saved, tmp_path / "v3.safetensors", meta_update={"p3s_format_version": str(FORMAT_VERSION + 1)})
    with pytest.raises(AdapterFileError, match="newer P3S version") as ei:
        load_adapter(p)
    assert "update the pack" in str(ei.value)


def test_plain_safetensors_without_p3s_metadata_is_refused(tmp_path):
    p = tmp_path / "lora.safetensors"
    save_file({"a": torch.zeros(2)}, str(p))
    with pytest.raises(AdapterFileError, match="not a P3S adapter"):
        load_adapter(p)


def test_missing_extra_and_misshaped_tensors_are_refused(saved, tmp_path):
    p = _rewrite(saved, tmp_path / "m.safetensors", drop=("copy.zero_convs.middle_0.bias",))
    with pytest.raises(AdapterFileError, match=r"missing: copy\.zero_convs\.middle_0\.bias"):
        load_adapter(p)
    p = _rewrite(saved, tmp_path / "e.safetensors", add={"copy.extra.weight": torch.zeros(3)})
    with pytest.raises(AdapterFileError, match=r"unexpected tensors: copy\.extra\.weight"):
        load_adapter(p)
    p = _rewrite(saved, tmp_path / "s.safetensors", reshape={"encoder.to_v.weight": (4, 17)})
    with pytest.raises(AdapterFileError, match=r"wrong shape.*encoder\.to_v\.weight"):
        load_adapter(p)


def test_changed_layer_map_is_refused(saved, tmp_path):
    lm = layer_map(TINY)
    lm[0]["level"] = 1
    p = _rewrite(saved, tmp_path / "lm.safetensors", meta_update={"layer_map": json.dumps(lm)})
    with pytest.raises(AdapterFileError, match="layer map"):
        load_adapter(p)


def test_header_offsets_outside_the_file_are_refused(tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    p = tmp_path / "short.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(AdapterFileError, match="truncated"):
        read_safetensors_header(p)
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 24)
    with pytest.raises(AdapterFileError, match="trailing"):
        read_safetensors_header(p)
    bad = json.dumps({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}).encode()
    p.write_bytes(struct.pack("<Q", len(bad)) + bad + b"\0" * 16)
    with pytest.raises(AdapterFileError, match="do not match shape"):
        read_safetensors_header(p)


# --------------------------------------------------------------------------- atomic save


def _tmp_files(folder: Path):
    return [p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


def test_atomic_save_keeps_the_old_file_when_the_write_fails(tiny_adapter, tmp_path, monkeypatch):
    path = tmp_path / "sks.safetensors"
    save_adapter(tiny_adapter, path)
    before = path.read_bytes()
    seen = []

    def failing_fsync(fd):
        seen.extend(_tmp_files(tmp_path))  # the temp file exists at this point
        raise OSError("disk full")

    monkeypatch.setattr(safe_io.os, "fsync", failing_fsync)
    other = _tiny(seed=2)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(other, path)
    monkeypatch.undo()
    assert len(seen) == 1 and seen[0].startswith(".sks.safetensors.")
    assert path.read_bytes() == before
    assert _tmp_files(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sks.safetensors"]
    load_adapter(path)  # still a valid adapter


def test_stale_temp_files_of_a_crashed_save_are_cleaned_on_the_next_save(tiny_adapter, tmp_path):
    import os
    import time

    path = tmp_path / "sks.safetensors"
    stale = tmp_path / ".sks.safetensors.abc123.tmp"
    stale.write_bytes(b"half written")
    old = time.time() - 2 * safe_io.STALE_TEMP_S
    os.utime(stale, (old, old))
    fresh = tmp_path / ".sks.safetensors.def456.tmp"  # another process may be saving right now
    fresh.write_bytes(b"in progress")
    other = tmp_path / ".other.safetensors.abc.tmp"  # another target's temp file is not ours
    other.write_bytes(b"x")
    os.utime(other, (old, old))
    save_adapter(tiny_adapter, path)
    assert not stale.exists()
    assert fresh.exists() and other.exists()
    load_adapter(path)


def test_atomic_save_writes_standard_safetensors(tmp_path):
    tensors = {"b": torch.arange(6, dtype=torch.float16).reshape(2, 3), "a": torch.ones(3),
               "c": torch.tensor([1, 2], dtype=torch.int64), "e": torch.zeros(0)}
    p = atomic_save_safetensors(tensors, tmp_path / "sub" / "t.safetensors", {"z": "1", "a": "2"})
    back = load_file(str(p))
    assert set(back) == set(tensors)
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype and torch.equal(back[k], tensors[k])
    with safe_open(str(p), "pt") as f:
        assert f.metadata() == {"z": "1", "a": "2"}
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0  # data section aligned
    assert _tmp_files(p.parent) == []


def test_adapters_made_under_inference_mode_can_still_be_trained(saved):
    """ComfyUI runs nodes under torch.inference_mode(): the adapter must stay trainable."""
    with torch.inference_mode():
        made = new_adapter(TINY, seed=0, **ENC)
        loaded = load_adapter(saved)
    for adapter in (made, loaded):
        assert not any(p.is_inference() for p in adapter.parameters())
        adapter.train()
        lat = adapter.encode_reference(torch.randn(1, 4, 4, 4), torch.randn(1, 3, 16))
        out = adapter(torch.randn(1, 4, 4, 4), torch.tensor([5.0]), torch.randn(1, 3, 32), lat)
        sum(f.sum() for f in out.values()).backward()
        assert adapter.copy.zero_convs["input_1"].bias.grad is not None
