"""The P3S Trainer in the real ComfyUI with the random SD1.5 (paper Eq. 11-15, Sec. IV-A).

Kept cheap: 64x64 photos, 1-2 images, 1-2 epochs (a training step of the full-size SD1.5 + copy
takes seconds on a CPU). One successful run (2 images, with masks) is shared by several tests; the
cancel test resumes from it, so it also covers resuming and periodic saves.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

SIZE = 64
PROMPT = "a photo of sks dog"


def _node_args(sd15, clip_vision, images, /, **kw):
    args = dict(model=sd15.model, clip=sd15.clip, vae=sd15.vae, clip_vision=clip_vision, images=images,
                prompt=PROMPT, identifier="sks", epochs=1, learning_rate=1e-5, gamma=0.1, resolution=64,
                seed=0, save_name="p3s_it_subject", save_every=0)
    args.update(kw)
    return args


def _train(comfy, **args):
    with torch.inference_mode():  # ComfyUI runs nodes like this
        return comfy.node("P3STrainer")().train(**args)


def _p3s_folder(comfy) -> Path:
    return Path(comfy.folder_paths.get_folder_paths("p3s")[0])


def _tmp_files(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def photos():
    g = torch.Generator().manual_seed(11)
    imgs = torch.rand(2, SIZE, SIZE, 3, generator=g) * 0.3
    imgs[:, 16:48, 20:44, :] = torch.tensor([0.8, 0.5, 0.2])
    masks = torch.zeros(2, SIZE, SIZE)
    masks[:, 16:48, 20:44] = 1.0
    return SimpleNamespace(images=imgs, masks=masks)


@pytest.fixture(scope="module")
def first_run(comfy, sd15, clip_vision, photos):
    """2 images with their subject masks, 1 epoch = 2 steps, saved at the end only."""
    import comfy.utils as cu

    progress = []
    orig = cu.ProgressBar.update_absolute

    def spy(self, value, total=None, preview=None):
        progress.append((value, total, preview is not None))
        return orig(self, value, total, preview)

    cu.ProgressBar.update_absolute = spy
    try:
        out = _train(comfy, **_node_args(sd15, clip_vision, photos.images, mask=photos.masks, epochs=1,
                                         enhancement="self + cross attention (paper)"))
    finally:
        cu.ProgressBar.update_absolute = orig
    path = _p3s_folder(comfy) / "p3s_it_subject.safetensors"
    return SimpleNamespace(out=out, path=path, bytes=path.read_bytes(), progress=progress)


def test_trainer_runs_saves_and_reports(comfy, first_run):
    adapter, name, plot = first_run.out["result"]
    assert name == "p3s_it_subject.safetensors"
    assert first_run.path.is_file() and not _tmp_files(first_run.path.parent)
    assert adapter.training_info["steps"] == 2
    assert adapter.training_info["prompt"] == PROMPT and adapter.training_info["images"] == 2
    assert adapter.training_info["settings"]["lr"] == 1e-5
    assert math.isfinite(adapter.training_info["loss"])
    assert not adapter.training and not any(p.requires_grad for p in adapter.parameters())
    assert plot.ndim == 4 and plot.shape[0] == 1 and plot.shape[-1] == 3 and float(plot.max()) <= 1.0
    assert "2 steps" in first_run.out["ui"]["text"][0]
    # progress: one update per step, out of epochs x images, each with the loss plot as preview
    assert [(v, t) for v, t, _ in first_run.progress] == [(1, 2), (2, 2)]
    assert all(has_preview for _, _, has_preview in first_run.progress)


def test_saved_file_loads_and_differs_from_the_untrained_init(comfy, sd15, first_run):
    adapter_mod = comfy.core("adapter")
    backend = comfy.core("comfyui_engine")
    with torch.inference_mode():
        loaded = comfy.node("P3SAdapterLoader")().load("p3s_it_subject.safetensors")[0]
    trained = first_run.out["result"][0]
    t_sd, l_sd = trained.state_dict(), loaded.state_dict()
    assert t_sd.keys() == l_sd.keys() and all(torch.equal(t_sd[k].cpu(), l_sd[k]) for k in t_sd)
    assert loaded.training_info["steps"] == 2
    with torch.inference_mode(False):
        init = adapter_mod.new_adapter(unet_state_dict=backend.base_unet_state_dict(sd15.model), seed=0,
                                       enhancement="cross")
    i_sd = init.state_dict()
    assert loaded.base_unet_hash == init.base_unet_hash
    # gradients reached every part through the frozen UNet: the zero convs of the copy (Eq. 6), the
    # copy's own layers, and the RNGR encoder's zero conv Z (Eq. 4-5)
    for key in ["copy.zero_convs.input_1.weight", "copy.zero_convs.output_11.weight",
                "copy.zero_convs.middle_0.weight", "copy.levels.0.res.in_layers.2.weight",
                "copy.levels.0.st.transformer_blocks.0.attn2.to_q.weight", "encoder.zero_conv.weight",
                "encoder.to_v.weight", "copy.cross_zero_convs.input_1.weight",
                "copy.cross_zero_convs.output_11.weight", "copy.cross_zero_convs.middle_0.weight"]:
        assert not torch.equal(i_sd[key], l_sd[key]), key
    # the Trainer's default is the paper's self + cross attention injection (issue 22); all 16 of the
    # cross-attention enhancement's zero convs learned through L_LDM
    assert loaded.enhancement == "cross" and float(i_sd["copy.cross_zero_convs.input_1.weight"].abs().max()) == 0.0
    assert all(not torch.equal(i_sd[k], l_sd[k]) for k in i_sd if k.startswith("copy.cross_zero_convs.")
               and k.endswith(".weight"))
    assert float(i_sd["copy.zero_convs.input_1.weight"].abs().max()) == 0.0
    # 2 AdamW steps at lr 1e-5 move each weight by about 2e-5, not more
    delta = max(float((l_sd[k] - i_sd[k]).abs().max()) for k in i_sd)
    assert 0 < delta < 1e-3, delta


def test_trained_adapter_drives_the_injector_in_a_ksampler_run(comfy, sd15, clip_vision, photos, first_run):
    """The trained adapter feeds all 16 self-attention layers of a real KSampler step (Eq. 7-8)."""
    copy_mod = comfy.core("copy_unet")
    out, seen = comfy.injected_layers(sd15, clip_vision, first_run.out["result"][0], photos.images[:1], PROMPT, SIZE)
    assert torch.isfinite(out).all() and out.shape == (1, 4, SIZE // 8, SIZE // 8)
    assert seen == {e["key"] for e in copy_mod.LAYER_MAP}


def test_cancel_keeps_the_last_completed_save_and_resume_continues(comfy, sd15, clip_vision, photos, first_run):
    """Resume from the first run (2 steps), save every step, press Cancel at the 2nd step of this run."""
    import comfy.model_management as mm
    import comfy.utils as cu

    folder = _p3s_folder(comfy)
    with torch.inference_mode():
        start = comfy.node("P3SAdapterLoader")().load("p3s_it_subject.safetensors")[0]
    name = "p3s_it_cancel"
    target = folder / f"{name}.safetensors"
    if target.exists():
        target.unlink()
    orig = cu.ProgressBar.update_absolute
    seen = []

    def cancel_at_2(self, value, total=None, preview=None):
        seen.append(value)
        orig(self, value, total, preview)
        if value == 2:
            mm.interrupt_current_processing(True)  # what the Cancel button does

    cu.ProgressBar.update_absolute = cancel_at_2
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _train(comfy, **_node_args(sd15, clip_vision, photos.images[:1], epochs=3, save_every=1,
                                       save_name=name, resume_adapter=start))
    finally:
        cu.ProgressBar.update_absolute = orig
        mm.interrupt_current_processing(False)
    assert seen == [1, 2]  # stopped at once: no third step
    assert not _tmp_files(folder)
    # the save of step 1 of this run is intact; nothing of the cancelled step 2 was written
    with torch.inference_mode():
        kept = comfy.node("P3SAdapterLoader")().load(f"{name}.safetensors")[0]
    assert kept.training_info["steps"] == 3  # resumed at 2, +1 completed step
    assert kept.training_info["images"] == 1
    k_sd, s_sd = kept.state_dict(), start.state_dict()
    assert any(not torch.equal(k_sd[k], s_sd[k]) for k in k_sd)
    # the input adapter was not trained in place (nodes are pure) and the first file is untouched
    f_sd = first_run.out["result"][0].state_dict()
    assert all(torch.equal(s_sd[k], f_sd[k].cpu()) for k in s_sd) and start.training_info["steps"] == 2
    assert first_run.path.read_bytes() == first_run.bytes


def test_cache_inputs_match_comfyui_nodes(comfy, sd15, clip_vision):
    """Latents, text conditioning and CLIP hidden states equal what the core nodes compute."""
    tr = comfy.core("comfyui_engine")
    backend = comfy.core("comfyui_engine")
    g = torch.Generator().manual_seed(2)
    img = torch.rand(1, 80, 64, 3, generator=g)  # portrait: the short side (64) becomes 64
    mask = torch.zeros(1, 80, 64)
    mask[:, :40] = 1.0
    with torch.inference_mode():
        batches = tr.cache_inputs(sd15.model, sd15.clip, sd15.vae, clip_vision, img, PROMPT, mask, resolution=64)
        enc = comfy.node("CLIPTextEncode")()
        cond = enc.encode(sd15.clip, PROMPT)[0][0][0]
        empty = enc.encode(sd15.clip, "")[0][0][0]
        lat = comfy.node("VAEEncode")().encode(sd15.vae, img)[0]["samples"]
        lat = sd15.model.model.process_latent_in(lat)
        hidden = backend.clip_patch_tokens(clip_vision, backend.letterboxed_batch(img)[0])
    (b,) = batches
    assert not any(t.is_inference() for t in (b.latent, b.context, b.uncond, b.clip_hidden, b.mask))
    assert b.latent.shape == (1, 4, 10, 8) and torch.allclose(b.latent, lat.float(), atol=1e-5)
    assert torch.equal(b.context, cond.float()) and torch.equal(b.uncond, empty.float())
    assert b.clip_hidden.shape == (1, 257, 1024) and torch.allclose(b.clip_hidden, hidden.float(), atol=1e-5)
    assert b.mask.shape == (1, 1, 10, 8)
    assert torch.allclose(b.mask[0, 0, :5], torch.ones(5, 8)) and torch.allclose(b.mask[0, 0, 5:], torch.zeros(5, 8))
    resized_size = comfy.core("train").resized_size
    assert resized_size(80, 64, 512) == (640, 512) and resized_size(300, 500, 512) == (512, 856)
    assert resized_size(64, 64, 128) == (128, 128)


def test_attention_capture_is_explicit_softmax_and_matches_comfyui(comfy, sd15):
    """The attn2 replace patch returns ComfyUI's attention output and stores softmax(QK^T/sqrt d)."""
    tr = comfy.core("comfyui_engine")
    from comfy.ldm.modules import attention as comfy_attn

    attn2 = sd15.model.model.diffusion_model.output_blocks[11][1].transformer_blocks[0].attn2
    heads = attn2.heads
    g = torch.Generator().manual_seed(4)
    with torch.inference_mode(False), torch.no_grad():
        x = torch.randn(2, 48, 320, generator=g)
        ctx = torch.randn(2, 77, 768, generator=g)
        q, k, v = attn2.to_q(x), attn2.to_k(ctx), attn2.to_v(ctx)
        cap = tr.OriginalAttentionCapture()
        out = cap(q, k, v, {"n_heads": heads, "block": ("output", 11), "original_shape": [2, 4, 6, 8]})
        ref_out = comfy_attn.attention_basic(q, k, v, heads)
    assert torch.allclose(out, ref_out, atol=1e-5)
    m = cap.maps["output_11"]
    assert m.shape == (2, 48, 77) and cap.grids["output_11"] == (6, 8)
    d = 320 // heads
    for b, i in [(0, 0), (1, 47), (1, 13)]:  # explicit per-row, per-head softmax, averaged over heads
        rows = []
        for h in range(heads):
            logits = torch.stack([sum(q[b, i, h * d + c] * k[b, j, h * d + c] for c in range(d)) / math.sqrt(d)
                                  for j in range(77)])
            e = torch.exp(logits - logits.max())
            rows.append(e / e.sum())
        assert torch.allclose(m[b, i], torch.stack(rows).mean(0), atol=1e-5)


def test_bad_inputs_fail_before_any_work(comfy, sd15, clip_vision, photos, monkeypatch):
    errors = comfy.core("errors")
    tr = comfy.core("comfyui_engine")
    node_mod = sys.modules[comfy.pack.__name__ + ".nodes.trainer_nodes"]

    def no_training(*a, **k):
        raise AssertionError("training started although an input was bad")

    monkeypatch.setattr(comfy.core("comfyui_engine.training"), "run_training", no_training)
    imgs = photos.images
    cases = [
        (dict(images=imgs[:0]), errors.ImageInputError, "images"),
        (dict(mask=torch.ones(3, SIZE, SIZE)), errors.ImageInputError, "mask"),
        (dict(mask=torch.ones(2, 32, 32)), errors.ImageInputError, "mask"),
        (dict(prompt="a photo of a dog"), errors.TrainingConfigError, "prompt"),
        (dict(identifier="zwx"), errors.TrainingConfigError, "prompt"),
        (dict(epochs=0), errors.TrainingConfigError, "epochs"),
        (dict(learning_rate=0.0), errors.TrainingConfigError, "learning_rate"),
        (dict(learning_rate=float("nan")), errors.TrainingConfigError, "learning_rate"),
        (dict(resolution=100), errors.TrainingConfigError, "resolution"),
        (dict(save_name="../escape"), errors.AdapterFileError, "save_name"),
        (dict(resume_adapter=object()), errors.AdapterFileError, "resume_adapter"),
        (dict(model=sd15.clip), errors.ModelMismatchError, "model"),
        (dict(clip=sd15.vae), errors.ModelMismatchError, "clip"),
        (dict(vae=sd15.clip), errors.ModelMismatchError, "vae"),
        (dict(clip_vision=sd15.vae), errors.ModelMismatchError, "clip_vision"),
    ]
    for kw, exc, field in cases:
        with pytest.raises(exc) as err:
            _train(comfy, **_node_args(sd15, clip_vision, kw.pop("images", imgs), **kw))
        assert err.value.input_name == field, (kw, str(err.value))
        assert "Fix:" in str(err.value)

    class Usage:
        free = 100 * 2**20  # 100 MiB: less than twice an SD1.5 adapter (~720 MB)

    monkeypatch.setattr(node_mod.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(errors.TrainingConfigError) as err:
        _train(comfy, **_node_args(sd15, clip_vision, imgs))
    assert err.value.input_name == "save_name" and "GiB" in str(err.value)
    assert not (_p3s_folder(comfy) / "escape.safetensors").exists()


def test_step_matches_apply_model_and_all_layer_loss(comfy, sd15, clip_vision, photos, first_run):
    """One step's eps prediction equals ComfyUI's own apply_model path on the same x_t, sigma and
    patches (so the frozen copy, calculate_input and timestep are right), and ac_layers='all'
    compares all 16 cross-attention maps."""
    tr = comfy.core("comfyui_engine")
    train = comfy.core("train")
    with torch.inference_mode():
        (b,) = tr.cache_inputs(sd15.model, sd15.clip, sd15.vae, clip_vision, photos.images[:1], PROMPT,
                               resolution=64)
        unet = tr.frozen_unet_copy(sd15.model)
        adapter = tr.new_training_adapter(unet, resume=first_run.out["result"][0])
    with torch.inference_mode(False), torch.no_grad():
        g = torch.Generator().manual_seed(9)
        for conv in adapter.copy.zero_convs.values():  # a clearly active adapter
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.05)
    assert not any(p.is_inference() for p in unet.parameters())
    assert not any(p.requires_grad for p in unet.parameters())
    settings = train.TrainSettings(ac_layers="all")
    ctx = tr.build_step_fn(sd15.model, adapter, settings, unet=unet)
    eps = {}
    orig_unet_forward = unet.forward

    def spy(*a, **k):
        eps["mine"] = out = orig_unet_forward(*a, **k)
        return out

    unet.forward = spy
    try:
        with torch.inference_mode(False), torch.no_grad():
            l_ldm, l_ac = ctx.step_fn(adapter, b.latent, b.context, b.clip_hidden, torch.Generator().manual_seed(3))
            assert len(ctx.capture.maps) == 16
            # replay the step's draws and run ComfyUI's apply_model with the same patches
            g = torch.Generator().manual_seed(3)
            t = torch.randint(0, 1000, (1,), generator=g)
            noise = torch.randn(tuple(b.latent.shape), generator=g)
            ms = sd15.model.get_model_object("model_sampling")
            sigma = ms.sigma(t.float())
            xt = b.latent + noise * sigma
            ctx.patch.i2 = adapter.encode_reference(b.latent, b.clip_hidden)
            opts = dict(ctx.patched.model_options["transformer_options"])
            opts["wrappers"] = ctx.patched.wrappers
            opts.update(cond_or_uncond=[0], sigmas=sigma)
            denoised = sd15.model.model.apply_model(xt, sigma, c_crossattn=b.context,
                                                                     transformer_options=opts)
    finally:
        unet.forward = orig_unet_forward
        ctx.close()
    eps_ref = (xt - denoised) / sigma
    assert torch.allclose(eps["mine"].float(), eps_ref, atol=2e-4, rtol=1e-3), \
        float((eps["mine"] - eps_ref).abs().max())
    assert float(l_ldm) == pytest.approx(float(((eps_ref - noise) ** 2).mean()), rel=1e-3)
    assert math.isfinite(float(l_ac)) and float(l_ac) > 0


def test_divergence_reports_and_keeps_the_last_save(comfy, sd15, clip_vision, photos, monkeypatch):
    """A non-finite loss (raised by the loop) leaves the last periodic save and says so."""
    errors = comfy.core("errors")
    train = comfy.core("train")
    folder = _p3s_folder(comfy)
    target = folder / "p3s_it_diverged.safetensors"
    if target.exists():
        target.unlink()

    def diverging_loop(adapter, batches, step_fn, settings, on_step=None, start_step=0, device=None, on_parts=None,
                       precision=None):
        on_parts(0.5, 0.0)  # as the real loop: the loss parts of a step, then the step
        on_step(start_step + 1, start_step + 2, 0.5)  # step 1 completes (and is saved: save_every=1)
        raise errors.TrainingDivergedError("learning_rate", "the loss became nan at step 2",
                                           "lower the learning rate")

    monkeypatch.setattr(train, "train_adapter", diverging_loop)
    # no backward pass runs here: the shared UNet can stand in for the frozen copy (saves time)
    tr = comfy.core("comfyui_engine")
    monkeypatch.setattr(comfy.core("comfyui_engine.training"), "frozen_unet_copy",
                        lambda model, device=None: model.model.diffusion_model)
    with pytest.raises(errors.TrainingDivergedError) as err:
        _train(comfy, **_node_args(sd15, clip_vision, photos.images[:1], epochs=2, save_every=1,
                                   save_name="p3s_it_diverged"))
    assert "the save of step 1" in str(err.value) and "is kept" in str(err.value)
    with torch.inference_mode():
        kept = comfy.node("P3SAdapterLoader")().load("p3s_it_diverged.safetensors")[0]
    assert kept.training_info["steps"] == 1 and not _tmp_files(folder)


def _validate_trainer_prompt(comfy, value):
    """ComfyUI's own prompt validation (execution.validate_inputs) of a P3S Trainer whose
    gradient_checkpointing is ``value`` (its upstream loaders marked valid: only this node is checked)."""
    import asyncio

    import execution

    link = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "clip_vision": ["2", 0], "images": ["3", 0]}
    widgets = {k: v for k, v in _node_args(SimpleNamespace(model=0, clip=0, vae=0), 0, 0).items()
               if k not in link}
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}},
              "2": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "x.safetensors"}},
              "3": {"class_type": "LoadImage", "inputs": {"image": "x.png"}},
              "4": {"class_type": "P3STrainer",
                    "inputs": {**link, **widgets, "gradient_checkpointing": value}}}
    validated = {k: (True, [], k) for k in ("1", "2", "3")}
    valid, errors, _ = asyncio.run(execution.validate_inputs("p3s-test", prompt, "4", validated))
    return valid, errors


def test_gradient_checkpointing_auto_on_off_and_saved_booleans(comfy, sd15, clip_vision, photos, first_run,
                                                               monkeypatch):
    """'auto' (the default) passes None to the core, which decides (off on the CPU at 64^2: the
    metadata and the text say so); 'on' / 'off' force it; workflows saved when the input was a
    BOOLEAN (true / false) pass ComfyUI's own validation and mean on / off; other values are refused."""
    info = comfy.node("P3STrainer").INPUT_TYPES()["optional"]["gradient_checkpointing"]
    assert info[0] == ["auto", "on", "off"] and info[1]["default"] == "auto"
    assert first_run.out["result"][0].training_info["gradient_checkpointing"] is False
    assert "gradient checkpointing off (auto)" in first_run.out["ui"]["text"][0]
    # what the node hands the core, for each choice (the spy stops before any work)
    tr = comfy.core("comfyui_engine")
    seen = []

    class Stop(Exception):
        pass

    def spy(*args, **kwargs):
        seen.append(kwargs["gradient_checkpointing"])
        raise Stop

    monkeypatch.setattr(comfy.core("comfyui_engine.training"), "run_training", spy)
    choices = ["auto", "on", "off", True, False]
    for choice in choices:
        with pytest.raises(Stop):
            _train(comfy, **_node_args(sd15, clip_vision, photos.images, gradient_checkpointing=choice))
    assert seen == [None, True, False, True, False]
    errors = comfy.core("errors")
    with pytest.raises(errors.TrainingConfigError, match="gradient_checkpointing"):
        _train(comfy, **_node_args(sd15, clip_vision, photos.images, gradient_checkpointing="sometimes"))
    assert len(seen) == len(choices)  # refused before any work
    monkeypatch.undo()
    # ComfyUI's prompt validation: the three choices and the saved booleans pass, anything else is refused
    for choice in choices:
        valid, errs = _validate_trainer_prompt(comfy, choice)
        assert valid, (choice, errs)
    valid, errs = _validate_trainer_prompt(comfy, "sometimes")
    assert not valid and "gradient_checkpointing" in str(errs)
    # a real run with a saved 'true': checkpointing on, recorded as such
    out = _train(comfy, **_node_args(sd15, clip_vision, photos.images[:1], gradient_checkpointing=True,
                                     save_name="p3s_it_ckpt"))
    assert out["result"][0].training_info["gradient_checkpointing"] is True
    assert out["ui"]["text"][0].endswith("gradient checkpointing on")
