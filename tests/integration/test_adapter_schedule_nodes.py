"""Adapter Loader / Save and the Timestep Weight Scheduler through the nodes a user would use."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_sd15_shaped_adapter(comfy):
    """A fresh SD1.5-shaped adapter (random copy, no base UNet needed for file round trips)."""
    adapter_mod = comfy.core("adapter")
    copy_mod = comfy.core("copy_unet")
    return adapter_mod.new_adapter(copy_mod.CopyUNetConfig.sd15(), seed=5)


def test_save_then_load_round_trip(comfy, tiny_sd15_shaped_adapter):
    with torch.inference_mode():
        out = comfy.node("P3SAdapterSave")().save(tiny_sd15_shaped_adapter, "round_trip")
    name = out["result"][0]
    assert name == "round_trip.safetensors"
    comfy.folder_paths.filename_list_cache.clear()
    assert name in comfy.node("P3SAdapterLoader").INPUT_TYPES()["required"]["adapter_name"][0]
    with torch.inference_mode():
        loaded = comfy.node("P3SAdapterLoader")().load(name)[0]
    a, b = tiny_sd15_shaped_adapter.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_missing_adapter_lists_folders(comfy):
    errors = comfy.core("errors")
    with pytest.raises(errors.AdapterFileError) as e:
        comfy.node("P3SAdapterLoader")().load("nope.safetensors")
    assert str(comfy.base / "models" / "p3s") in str(e.value) and "adapter_name" in str(e.value)


@pytest.mark.parametrize("bad", ["../evil", "sub/x", "..\\x", ".hidden", ""])
def test_adapter_names_with_paths_are_refused(comfy, tiny_sd15_shaped_adapter, bad):
    errors = comfy.core("errors")
    with pytest.raises(errors.AdapterFileError, match="plain file name"):
        comfy.node("P3SAdapterSave")().save(tiny_sd15_shaped_adapter, bad)
    with pytest.raises(errors.AdapterFileError, match="plain file name"):
        comfy.node("P3SAdapterLoader")().load(bad)


def test_scheduler_node_matches_eq10_and_plots(comfy):
    node = comfy.node("P3STimestepWeightScheduler")()
    schedule, plot = node.build("paper", 0.5, 0.2, 2.0, 1.0, 0.2, 1.2, 0.0, 1.0, 1.0)
    for t in (0.0, 0.25, 0.5, 1.0):
        assert schedule.curve(t) == pytest.approx(1 - 0.5 * t ** 2 + 0.2)
    assert plot.shape[0] == 1 and plot.shape[-1] == 3 and plot.max() <= 1 and plot.std() > 0.01
    custom, _ = node.build("custom", 0.5, 0.2, 2.0, 1.0, 0.2, 1.2, 0.0, 1.0, 2.0, custom_values="0.5, 1.5")
    assert custom.weight_at(1.0) == pytest.approx(1.0) and custom.weight_at(0.0) == pytest.approx(3.0)


def test_scheduler_node_errors(comfy):
    errors = comfy.core("errors")
    node = comfy.node("P3STimestepWeightScheduler")()
    with pytest.raises(errors.ScheduleError, match="start_percent|end_percent"):
        node.build("paper", 0.5, 0.2, 2.0, 1.0, 0.2, 1.2, 0.8, 0.2, 1.0)
    with pytest.raises(errors.ScheduleError, match="custom_values"):
        node.build("custom", 0.5, 0.2, 2.0, 1.0, 0.2, 1.2, 0.0, 1.0, 1.0, custom_values="a, b")


def test_adapter_in_a_subfolder_listed_by_the_loader_loads(comfy, tiny_sd15_shaped_adapter):
    adapter_mod = comfy.core("adapter")
    folder = comfy.base / "models" / "p3s" / "people"
    folder.mkdir(exist_ok=True)
    adapter_mod.save_adapter(tiny_sd15_shaped_adapter, folder / "anna.safetensors")
    comfy.folder_paths.filename_list_cache.clear()
    assert "people/anna.safetensors" in comfy.node("P3SAdapterLoader").INPUT_TYPES()["required"]["adapter_name"][0]
    with torch.inference_mode():
        loaded = comfy.node("P3SAdapterLoader")().load("people/anna.safetensors")[0]
    assert torch.equal(loaded.encoder.to_k.weight, tiny_sd15_shaped_adapter.encoder.to_k.weight)
