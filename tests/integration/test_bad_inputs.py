"""The bad-input catalogue (docs/ERRORS.md): every row goes through the node a user would use, in the
real ComfyUI, and checks the typed error, that its message names the input and the fix, and that it
is raised before any work (no CLIP / VAE run, no file read or written) where that can be observed.

Non-SD1.5 MODELs, CLIP vision models and VAEs are real ComfyUI objects built from small configs
(random weights): ``comfy.supported_models.SDXL`` / ``SD20`` / ``SD15`` + ``ModelPatcher``,
``comfy.clip_vision.ClipVisionModel`` fed a transformers ``CLIPVisionModelWithProjection`` state dict,
and ``comfy.sd.VAE`` from a 16-channel TAESD state dict. Nothing of ComfyUI is mocked; "spies" only
replace a method of one object for one test so that a call to it fails the test.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

H, W = 96, 160

# --------------------------------------------------------------------------- helpers


def expect(comfy, error: str, input_name: str, fix: str, problem: str | None = None):
    """``pytest.raises`` for a pack error class, then the message checks of every catalogue row."""
    cls = getattr(comfy.core("errors"), error, None)
    if cls is None:  # SettingError lives with the node helpers
        cls = getattr(node_common(comfy), error)
    return _Expect(cls, input_name, fix, problem)


class _Expect:
    def __init__(self, cls, input_name, fix, problem):
        self.cls, self.input_name, self.fix, self.problem = cls, input_name, fix, problem
        self._raises = pytest.raises(cls)

    def __enter__(self):
        self.info = self._raises.__enter__()
        return self.info

    def __exit__(self, *exc):
        out = self._raises.__exit__(*exc)
        if not out:  # another exception type: let it propagate unchanged
            return out
        err = self.info.value
        msg = str(err)
        assert type(err) is self.cls, f"{type(err).__name__}: {msg}"
        assert err.input_name == self.input_name, msg
        assert msg.startswith(f"P3S: input '{self.input_name}': "), msg
        fix = msg.split(". Fix: ", 1)
        assert len(fix) == 2 and self.fix.lower() in fix[1].lower(), msg
        if self.problem is not None:
            assert self.problem.lower() in fix[0].lower(), msg
        return out


def node_common(comfy):
    import importlib

    return importlib.import_module(f"{comfy.pack.__name__}.nodes.common")


def forbid(monkeypatch, obj, attr: str, calls: list):
    """Replace ``obj.attr`` for this test: any call is recorded and fails the test (work started)."""
    def spy(*args, **kwargs):
        calls.append(attr)
        raise AssertionError(f"{attr} ran: the bad input was not refused before the work")

    monkeypatch.setattr(obj, attr, spy)


def files_under(folder) -> set[str]:
    folder = Path(folder)
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


def images(b=2, h=H, w=W, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, w, c, generator=g)


STATE = {"width": W, "height": H, "images": [{"positive": [[35, 45]], "negative": [[125, 45]]},
                                             {"positive": [[70, 55]], "negative": []}]}

# --------------------------------------------------------------------------- real non-SD1.5 objects


def tiny_unet_model(kind: str):
    """A real ComfyUI MODEL (ModelPatcher over a model_base model) of another family, one UNet level."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm

    cfg = {"use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
           "num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1],
           "transformer_depth_middle": 1, "use_spatial_transformer": True, "legacy": False, "context_dim": 768,
           "use_linear_in_transformer": False, "use_temporal_attention": False, "use_temporal_resblock": False,
           "dtype": torch.float32}
    if kind == "sdxl":
        cfg.update(context_dim=2048, use_linear_in_transformer=True, num_classes="sequential", adm_in_channels=2816)
        model_config = sm.SDXL(cfg)
    elif kind == "sd2":
        cfg.update(context_dim=1024, use_linear_in_transformer=True)
        model_config = sm.SD20(cfg)
    elif kind == "sd15_inpaint":
        cfg.update(in_channels=9)
        model_config = sm.SD15(cfg)
    else:
        raise ValueError(kind)
    with torch.inference_mode(False):
        model = model_config.get_model({})
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


@pytest.fixture(scope="module")
def other_models(comfy):
    return {kind: tiny_unet_model(kind) for kind in ("sdxl", "sd2", "sd15_inpaint")}


def tiny_clip_vision(tmp_path: Path, hidden: int, patch: int, heads: int, proj: int):
    """A real ComfyUI CLIP vision model (ClipVisionModel) of another shape, 2 layers, random weights.

    ComfyUI 0.3.75's ``load_clipvision_from_sd`` only recognises full-depth G/H/L/SigLIP/DINOv2
    files (it counts layers), so the object is built with ComfyUI's own class from a config file
    and loaded with a transformers state dict, exactly as that loader does after detection.
    """
    import comfy.clip_vision
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    hf_cfg = CLIPVisionConfig(hidden_size=hidden, patch_size=patch, image_size=224, num_hidden_layers=2,
                              intermediate_size=4 * hidden, num_attention_heads=heads, projection_dim=proj)
    torch.manual_seed(0)
    with torch.inference_mode(False):
        sd = CLIPVisionModelWithProjection(hf_cfg).state_dict()
    cfg = {k: getattr(hf_cfg, k) for k in ("hidden_size", "image_size", "intermediate_size", "num_attention_heads",
                                           "num_channels", "num_hidden_layers", "patch_size", "projection_dim",
                                           "hidden_act", "layer_norm_eps")}
    cfg["model_type"] = "clip_vision_model"
    path = tmp_path / f"clip_vision_{hidden}_{patch}.json"
    path.write_text(json.dumps(cfg))
    clip = comfy.clip_vision.ClipVisionModel(str(path))
    missing, unexpected = clip.load_sd(sd)
    assert not missing and not unexpected
    return clip


@pytest.fixture(scope="module")
def other_clip_visions(comfy, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clipv")
    out = {"ViT-H/14-shaped": tiny_clip_vision(tmp, 1280, 14, 16, 1024),
           "ViT-B/32-shaped": tiny_clip_vision(tmp, 768, 32, 12, 512)}
    with torch.inference_mode():  # they are working models, just not ViT-L/14
        assert out["ViT-H/14-shaped"].encode_image(images(1, 64, 64))["last_hidden_state"].shape == (1, 257, 1280)
        assert out["ViT-B/32-shaped"].encode_image(images(1, 64, 64))["last_hidden_state"].shape == (1, 50, 768)
    return out


@pytest.fixture(scope="module")
def vae16(comfy):
    """A real ComfyUI VAE with 16-channel latents (a TAESD3/TAEF1-layout tiny autoencoder)."""
    import comfy.sd
    from comfy.taesd.taesd import TAESD

    with torch.inference_mode(False):
        sd = TAESD(latent_channels=16).state_dict()
    vae = comfy.sd.VAE(sd=sd)
    assert vae.latent_channels == 16
    return vae


@pytest.fixture(scope="module")
def tiny_adapter(comfy):
    adapter_mod = comfy.core("adapter")
    copy_mod = comfy.core("copy_unet")
    return adapter_mod.new_adapter(copy_mod.CopyUNetConfig.tiny(), seed=1, clip_dim=16, encoder_inner_dim=8)


def test_positive_controls_pass_the_checks(comfy, sd15, clip_vision, tiny_adapter):
    """The real SD1.5 / ViT-L/14 / VAE / adapter pass the same checks the bad ones fail."""
    backend = comfy.core("comfyui_engine")
    backend.check_sd15(sd15.model)
    backend.check_vae_sd15(sd15.vae)
    backend.check_clip_vit_l(clip_vision)
    adapter_nodes = __import__(f"{comfy.pack.__name__}.nodes.adapter_nodes", fromlist=["check_adapter"])
    assert adapter_nodes.check_adapter(tiny_adapter) is tiny_adapter
    common = node_common(comfy)
    assert common.check_image_batch(images()) == (2, H, W, 3)
    # IMAGE values: 0 and 1 themselves, and float rounding within the margin, pass; just beyond does not
    edge = images()
    edge[0, 0, 0] = torch.tensor([0.0, 1.0, 1.0 + 0.5 * common.IMAGE_VALUE_MARGIN])
    edge[1, 0, 0, 0] = -0.5 * common.IMAGE_VALUE_MARGIN
    assert common.check_image_batch(edge) == (2, H, W, 3)
    edge[1, 0, 0, 0] = -2 * common.IMAGE_VALUE_MARGIN
    with pytest.raises(comfy.core("errors").ImageInputError, match="outside 0..1"):
        common.check_image_batch(edge)
    # the core 'Upscale Image' methods the fix of the bicubic row names stay in 0..1 (bicubic does not)
    with torch.inference_mode():
        for method in ("bilinear", "area", "lanczos", "nearest-exact"):
            up = comfy.node("ImageScale")().upscale(images(2, H // 2, W // 2), method, W, H, "disabled")[0]
            assert common.check_image_batch(up) == (2, H, W, 3), method


# =========================================================================== P3S Point Selector


def select(comfy, image, **kw):
    with torch.inference_mode():
        return comfy.node("P3SPointSelector")().select(image, **kw)


@pytest.fixture
def no_temp_files(comfy):
    """The Point Selector writes its temp PNGs last: a refused input leaves the temp folder as it was."""
    temp = comfy.folder_paths.get_temp_directory()
    before = files_under(temp)
    yield
    assert files_under(temp) == before


def test_point_selector_no_point(comfy, no_temp_files):
    with expect(comfy, "PointsError", "points_store", "click on the subject", "no point was clicked"):
        select(comfy, images(), points_store="")


def test_point_selector_only_negative_clicks(comfy, no_temp_files):
    state = {"width": W, "height": H, "images": [{"positive": [], "negative": [[125, 45]]}]}
    with expect(comfy, "PointsError", "points_store", "positive point on the subject", "no positive point on image 0"):
        select(comfy, images(), points_store=json.dumps(state))


def test_point_selector_negative_coordinates_without_positive(comfy, no_temp_files):
    with expect(comfy, "PointsError", "coordinates_positive", "connect positive coordinates",
                "negative points were given but no positive point"):
        select(comfy, images(), points_store="", coordinates_negative='[{"x": 120, "y": 40}]')


@pytest.mark.parametrize("coords", ['[{"x": 500, "y": 10}]', '[{"x": 10, "y": -3}]'])
def test_point_selector_point_outside_image(comfy, no_temp_files, coords):
    with expect(comfy, "PointsError", "coordinates_positive", f"0 <= x <= {W} and 0 <= y <= {H}",
                f"outside the {W}x{H}"):
        select(comfy, images(), points_store="", coordinates_positive=coords)


def test_point_selector_malformed_coordinates(comfy, no_temp_files):
    with expect(comfy, "PointsError", "coordinates_positive", 'JSON like [{"x": 312, "y": 205}]', "not valid JSON"):
        select(comfy, images(), points_store="", coordinates_positive='[{"x": 12, "y": }')


@pytest.mark.parametrize("value", ["NaN", "Infinity"])
def test_point_selector_non_finite_coordinate(comfy, no_temp_files, value):
    with expect(comfy, "PointsError", "coordinates_positive", "finite pixel coordinates", "not finite"):
        select(comfy, images(), points_store="", coordinates_positive=f'[{{"x": {value}, "y": 5}}]')


def test_point_selector_coordinate_not_a_number(comfy, no_temp_files):
    with expect(comfy, "PointsError", "coordinates_positive", "plain numbers", "is not a number"):
        select(comfy, images(), points_store="", coordinates_positive='[{"x": "left", "y": 5}]')


def test_point_selector_point_without_y(comfy, no_temp_files):
    with expect(comfy, "PointsError", "coordinates_positive", '{"x": <pixels>, "y": <pixels>}', "has no 'y' key"):
        select(comfy, images(), points_store="", coordinates_positive='[{"x": 5}]')


def test_point_selector_per_image_lists_do_not_match_batch(comfy, no_temp_files):
    three = json.dumps([[{"x": 1, "y": 1}]] * 3)
    with expect(comfy, "PointsError", "coordinates_positive", "give exactly 2 lists",
                "3 per-image point lists but the image batch has 2"):
        select(comfy, images(), points_store="", coordinates_positive=three)


def test_point_selector_clicks_for_more_images_than_batch(comfy, no_temp_files):
    three = dict(STATE, images=STATE["images"] + [{"positive": [[1, 1]], "negative": []}])
    with expect(comfy, "PointsError", "points_store", "connect the image batch the points were clicked on",
                "points for 3 images but the image batch has 2"):
        select(comfy, images(), points_store=json.dumps(three))


def test_point_selector_too_many_points(comfy, no_temp_files):
    many = json.dumps([{"x": 5, "y": 5}] * 101)
    with expect(comfy, "PointsError", "coordinates_positive", "at most 100 points per image",
                "101 points for each image (at most 100 positive and 100 negative per image)"):
        select(comfy, images(), points_store="", coordinates_positive=many)


def test_point_selector_coordinate_text_too_long(comfy, no_temp_files, monkeypatch):
    points_mod = comfy.core("points")
    calls = []
    forbid(monkeypatch, points_mod.json, "loads", calls)  # refused from the length, before parsing
    text = json.dumps([{"x": 5, "y": 5}] * 20_000)
    with expect(comfy, "PointsError", "coordinates_positive", "at most 100 points per image",
                f"the text is {len(text):,} characters long (at most 200,000)"):
        select(comfy, images(), points_store="", coordinates_positive=text)
    assert calls == []


def test_point_selector_widget_state_too_long(comfy, no_temp_files):
    state = json.dumps({"images": [{"positive": [[5, 5]] * 30_000}]})
    with expect(comfy, "PointsError", "points_store", "click the points again", "characters long (at most 200,000)"):
        select(comfy, images(), points_store=state)


def test_point_selector_corrupt_widget_state(comfy, no_temp_files):
    with expect(comfy, "PointsError", "points_store", "click the points again", "not valid JSON"):
        select(comfy, images(), points_store='{"images": [')


# --- the IMAGE input (shared check: Point Selector, RNGR, Injector reference) -----------------

BAD_IMAGES = {
    "empty_batch": (lambda: torch.zeros(0, H, W, 3), "the IMAGE batch is empty", "connect at least one image"),
    "grayscale": (lambda: images(c=1), "1 channel (grayscale)", "convert them to RGB"),
    "rgba": (lambda: images(c=4), "4 channels (RGBA)", "Split Image with Alpha"),
    "channels_first": (lambda: images().movedim(-1, 1), "channels-first", "standard ComfyUI IMAGE"),
    "numpy_array": (lambda: images().numpy(), "got a ndarray", "connect an IMAGE output"),
    "list_of_images": (lambda: list(images()), "got a list", "connect an IMAGE output"),
    "three_dims": (lambda: images()[0], "expected an IMAGE batch [B,H,W,3]", "Load Image"),
    "tiny_8x8": (lambda: images(h=8, w=8), "below one CLIP patch", "at least 64x64"),
    "uint8_values": (lambda: (images() * 255).to(torch.uint8), "dtype torch.uint8", "float 0..1"),
    "nan_pixels": (lambda: images().index_put_((torch.tensor([0]),), torch.tensor(float("nan"))),
                   "NaN or infinite", "check the node that produced them"),
    "batch_too_large": (lambda: torch.rand(65, 16, 16, 3), "the batch has 65 images (at most 64)",
                        "at most 64 reference images"),
    "side_too_large": (lambda: torch.rand(1, 16, 8200, 3), "8200x16 pixels (at most 8192 per side)",
                       "scale them down first"),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_point_selector_bad_image(comfy, no_temp_files, case):
    make, problem, fix = BAD_IMAGES[case]
    with expect(comfy, "ImageInputError", "image", fix, problem):
        select(comfy, make(), points_store=json.dumps(STATE))


# =========================================================================== P3S RNGR Mask + Inpaint


@pytest.fixture(scope="module")
def points2(comfy):
    return select(comfy, images(), points_store=json.dumps(STATE))["result"][0]


def rngr(comfy, image, points, clip_vision, **kw):
    args = dict(sigma=0.75, fill="flat", remove="distractor", grow=2)
    args.update(kw)
    with torch.inference_mode():
        return comfy.node("P3SRNGRMaskInpaint")().run(image, points, clip_vision, **args)


@pytest.fixture
def clip_must_not_run(monkeypatch, clip_vision):
    calls = []
    forbid(monkeypatch, clip_vision, "encode_image", calls)
    yield
    assert calls == []


def test_rngr_images_and_points_of_different_lengths(comfy, points2, clip_vision, clip_must_not_run):
    with expect(comfy, "PointsError", "points", "one set of points per image", "2 sets of points for 3 images"):
        rngr(comfy, images(3), points2, clip_vision)


def test_rngr_points_not_from_point_selector(comfy, clip_vision, clip_must_not_run):
    with expect(comfy, "PointsError", "points", "P3S Point Selector", "expected P3S_POINTS, got a str"):
        rngr(comfy, images(), '[{"x": 35, "y": 45}]', clip_vision)


def test_rngr_bad_image(comfy, points2, clip_vision, clip_must_not_run):
    with expect(comfy, "ImageInputError", "image", "Split Image with Alpha", "4 channels (RGBA)"):
        rngr(comfy, images(c=4), points2, clip_vision)


@pytest.mark.parametrize("shape", ["ViT-H/14-shaped", "ViT-B/32-shaped"])
def test_rngr_clip_vision_not_vit_l14(comfy, points2, other_clip_visions, monkeypatch, shape):
    calls = []
    forbid(monkeypatch, other_clip_visions[shape], "encode_image", calls)
    with expect(comfy, "ModelMismatchError", "clip_vision", "clip-vit-large-patch14", "not OpenAI CLIP ViT-L/14"):
        rngr(comfy, images(), points2, other_clip_visions[shape])
    assert calls == []


@pytest.mark.parametrize("name,value,problem", [("sigma", float("nan"), "not a finite number"),
                                                ("sigma", -1.0, "outside [0, 4]"),
                                                ("grow", -2, "outside [0, 128]"),
                                                ("grow", 2.5, "not a whole number"),
                                                ("fill", "lama", "not one of the options"),
                                                ("remove", "everything", "not one of the options")])
def test_rngr_setting_out_of_range(comfy, points2, clip_vision, clip_must_not_run, name, value, problem):
    fix = {"sigma": "between 0 and 4", "grow": "between 0 and 128", "fill": "'biharmonic'", "remove": "'distractor'"}
    with expect(comfy, "SettingError", name, fix[name], problem):
        rngr(comfy, images(), points2, clip_vision, **{name: value})


# =========================================================================== P3S Timestep Weight Scheduler

SCHED = dict(mode="paper", alpha=0.5, beta=0.2, k=2.0, weight=1.0, low=0.2, high=1.2, start_percent=0.0,
             end_percent=1.0, strength=1.0, custom_values="")


def schedule(comfy, **kw):
    args = dict(SCHED)
    args.update(kw)
    with torch.inference_mode():
        return comfy.node("P3STimestepWeightScheduler")().build(**args)


@pytest.mark.parametrize("start,end", [(0.8, 0.2), (0.5, 0.5)])
def test_schedule_start_not_below_end(comfy, start, end):
    with expect(comfy, "ScheduleError", "start_percent", "smaller than end_percent", "is not below end_percent"):
        schedule(comfy, start_percent=start, end_percent=end)


@pytest.mark.parametrize("text,problem", [("0.5, nan", "weight 2 ('nan') is not a finite number"),
                                          ("0.5, inf, 1", "weight 2 ('inf') is not a finite number"),
                                          ("a, b", "is not a list of numbers"),
                                          ("0.4, -0.2", "weight 2 (-0.2) is negative"),
                                          ("  ", "the list is empty")])
def test_schedule_bad_custom_values(comfy, text, problem):
    with expect(comfy, "ScheduleError", "custom_values", "comma-separated weights", problem):
        schedule(comfy, mode="custom", custom_values=text)


def test_schedule_unknown_mode(comfy):
    with expect(comfy, "ScheduleError", "mode", "use one of: paper, fixed", "unknown mode 'linear'"):
        schedule(comfy, mode="linear")


@pytest.mark.parametrize("value,problem", [(-0.5, "is negative"), (float("nan"), "not finite")])
def test_schedule_strength_out_of_range(comfy, value, problem):
    fix = "strength >= 0" if value < 0 else "finite number"
    with expect(comfy, "ScheduleError", "strength", fix, problem):
        schedule(comfy, strength=value)


def test_schedule_quadratic_high_below_low(comfy):
    with expect(comfy, "ScheduleError", "high", "set high >= low", "below low"):
        schedule(comfy, mode="quadratic_increasing", low=1.0, high=0.5)


def test_schedule_paper_curve_would_go_negative(comfy):
    with expect(comfy, "ScheduleError", "alpha", "1 - alpha + beta >= 0", "(negative)"):
        schedule(comfy, alpha=3.0, beta=0.2)


# =========================================================================== P3S Condition Injector


@pytest.fixture
def inject_args(sd15, clip_vision, tiny_adapter, monkeypatch):
    """Good inputs; each test makes one bad. The VAE and CLIP must never run for a refused input."""
    calls = []
    forbid(monkeypatch, sd15.vae, "encode", calls)
    forbid(monkeypatch, clip_vision, "encode_image", calls)
    args = dict(model=sd15.model, adapter=tiny_adapter, reference=images(1, 64, 64), vae=sd15.vae,
                clip_vision=clip_vision, lam=0.2, strength=1.0, apply_to="cond and uncond")
    yield args
    assert calls == []


def inject(comfy, args, **kw):
    args = dict(args, **kw)
    with torch.inference_mode():
        return comfy.node("P3SConditionInjector")().inject(**args)


@pytest.mark.parametrize("kind,family", [("sdxl", "SDXL"), ("sd2", "SD2.x")])
def test_injector_model_not_sd15(comfy, inject_args, other_models, monkeypatch, kind, family):
    calls = []
    forbid(monkeypatch, other_models[kind], "clone", calls)
    with expect(comfy, "ModelMismatchError", "model", "load an SD1.5 checkpoint", f"the model is {family}"):
        inject(comfy, inject_args, model=other_models[kind])
    assert calls == []


def test_injector_sd15_inpainting_model(comfy, inject_args, other_models):
    with expect(comfy, "ModelMismatchError", "model", "regular (non-inpainting) SD1.5", "9 input channels"):
        inject(comfy, inject_args, model=other_models["sd15_inpaint"])


def test_injector_model_input_is_not_a_model(comfy, inject_args, sd15):
    with expect(comfy, "ModelMismatchError", "model", "MODEL output of a Load Checkpoint", "not a ComfyUI MODEL"):
        inject(comfy, inject_args, model=sd15.clip)


@pytest.mark.parametrize("shape", ["ViT-H/14-shaped", "ViT-B/32-shaped"])
def test_injector_clip_vision_not_vit_l14(comfy, inject_args, other_clip_visions, monkeypatch, shape):
    calls = []
    forbid(monkeypatch, other_clip_visions[shape], "encode_image", calls)
    with expect(comfy, "ModelMismatchError", "clip_vision", "clip-vit-large-patch14", "not OpenAI CLIP ViT-L/14"):
        inject(comfy, inject_args, clip_vision=other_clip_visions[shape])
    assert calls == []


def test_injector_vae_not_sd15(comfy, inject_args, vae16, monkeypatch):
    calls = []
    forbid(monkeypatch, vae16, "encode", calls)
    with expect(comfy, "ModelMismatchError", "vae", "VAE of the SD1.5 checkpoint", "16-channel latents"):
        inject(comfy, inject_args, vae=vae16)
    assert calls == []


@pytest.mark.parametrize("name,value,problem", [("lam", float("nan"), "not a finite number"),
                                                ("lam", -0.1, "outside [0, 2]"),
                                                ("lam", 3.0, "outside [0, 2]"),
                                                ("strength", float("inf"), "not a finite number"),
                                                ("strength", -1.0, "outside [0, 5]"),
                                                ("strength", "1.0", "is not a number"),
                                                ("apply_to", "uncond only", "not one of the options")])
def test_injector_setting_out_of_range(comfy, inject_args, name, value, problem):
    fix = {"lam": "between 0 and 2", "strength": "between 0 and 5", "apply_to": "'cond only'"}[name]
    with expect(comfy, "SettingError", name, fix, problem):
        inject(comfy, inject_args, **{name: value})


@pytest.mark.parametrize("case", ["rgba", "empty_batch", "numpy_array"])
def test_injector_bad_reference(comfy, inject_args, case):
    make, problem, fix = BAD_IMAGES[case]
    with expect(comfy, "ImageInputError", "reference", fix, problem):
        inject(comfy, inject_args, reference=make())


@pytest.mark.parametrize("value", [None, "p3s_adapter.safetensors"])
def test_injector_adapter_not_an_adapter(comfy, inject_args, value):
    with expect(comfy, "AdapterFileError", "adapter", "P3S Adapter Loader", "expected a P3S adapter"):
        inject(comfy, inject_args, adapter=value)


def test_injector_schedule_not_a_schedule(comfy, inject_args):
    with expect(comfy, "ScheduleError", "schedule", "P3S Timestep Weight Scheduler", "expected P3S_SCHEDULE"):
        inject(comfy, inject_args, schedule={"mode": "paper"})


@pytest.mark.parametrize("name,value,problem", [("reference_index", 64, "outside [0, 63]"),
                                                ("reference_mode", "average latents", "not one of the options"),
                                                ("level0_keys", "pooled", "not one of the options"),
                                                ("copy_precision", "fp8", "not one of the options"),
                                                ("cross_attention", "on", "not one of the options")])
def test_injector_reference_setting_out_of_range(comfy, inject_args, name, value, problem):
    fix = {"reference_index": "from 0 to 0", "reference_mode": "'average copy features'",
           "level0_keys": "'pooled 2x2 (faster)'", "copy_precision": "'same as the UNet', 'fp32'",
           "cross_attention": "'as the adapter holds', 'off'"}[name]
    with expect(comfy, "SettingError", name, fix, problem):
        inject(comfy, inject_args, **{name: value})


def test_injector_reference_index_beyond_the_references(comfy, inject_args):
    """Index 2 of two connected photos (0 and 1): refused before the VAE or CLIP vision runs."""
    with expect(comfy, "ImageInputError", "reference_index", "pick a reference index from 0 to 1",
                "2 is not a reference of the 2 given (0..1)"):
        inject(comfy, inject_args, reference=images(2, 64, 64), reference_index=2)


@pytest.mark.parametrize("missing", ["vae", "clip_vision"])
def test_injector_reference_without_its_encoder(comfy, inject_args, missing):
    fix = {"vae": "connect the checkpoint's VAE", "clip_vision": "clip-vit-large-patch14"}[missing]
    with expect(comfy, "ModelMismatchError", missing, fix, "a reference photo is connected but no"):
        inject(comfy, inject_args, **{missing: None})


def test_injector_old_adapter_without_reference(comfy, inject_args):
    """An adapter saved before adapters stored their cleaned photos, and no reference connected."""
    assert inject_args["adapter"].reference is None
    with expect(comfy, "ImageInputError", "reference", "re-train the adapter with this version",
                "this adapter file stores no reference"):
        inject(comfy, inject_args, reference=None, vae=None, clip_vision=None)


# =========================================================================== region (issue 16)


def expect_region(comfy, input_name, fix, problem):
    """``expect`` for RegionError (it lives with the region math in p3s_core/region.py)."""
    return _Expect(comfy.core("region").RegionError, input_name, fix, problem)


BAD_REGIONS = {
    "image_not_mask": (lambda: images(1, 64, 64), "IMAGE-shaped tensor", "Convert Image to Mask"),
    "batch_of_two": (lambda: torch.rand(2, 64, 64), "batch of 2 masks", "one P3S Condition Injector per region"),
    "nan": (lambda: torch.full((1, 16, 16), float("nan")), "NaN or infinite", "node that produced it"),
    "out_of_range": (lambda: torch.full((1, 16, 16), 255.0), "outside 0..1", "0 = outside the region"),
    "not_a_tensor": (lambda: [[0.0, 1.0]], "expected a MASK", "connect a MASK output"),
    "1d": (lambda: torch.ones(64), "expected a MASK [1,H,W]", "connect a MASK output"),
}


@pytest.mark.parametrize("case", list(BAD_REGIONS))
def test_injector_bad_region(comfy, inject_args, case):
    make, problem, fix = BAD_REGIONS[case]
    with expect_region(comfy, "region", fix, problem):
        inject(comfy, inject_args, region=make())


@pytest.mark.parametrize("value,problem", [(0.7, "outside [0, 0.5]"), (float("nan"), "not a finite number")])
def test_injector_feather_out_of_range(comfy, inject_args, value, problem):
    with expect(comfy, "SettingError", "feather", "between 0 (hard edge) and 0.5", problem):
        inject(comfy, inject_args, region=torch.ones(1, 8, 8), feather=value)


REGION_ARGS = dict(shape="box", width=64, height=64, left=0.25, top=0.25, right=0.75, bottom=0.75, invert=False)


def region_node(comfy, **kw):
    with torch.inference_mode():
        return comfy.node("P3SRegion")().make(**dict(REGION_ARGS, **kw))


@pytest.mark.parametrize("kw,name", [(dict(left=0.8, right=0.2), "right"), (dict(top=0.5, bottom=0.5), "bottom")])
def test_region_node_empty_box(comfy, kw, name):
    with expect_region(comfy, name, "0 <= left < right <= 1", "is empty or outside the frame"):
        region_node(comfy, **kw)


@pytest.mark.parametrize("name,value,problem", [("left", 1.5, "outside [0, 1]"), ("shape", "circle", "not one of the options"),
                                                ("width", 4, "outside [8, 8192]")])
def test_region_node_setting_out_of_range(comfy, name, value, problem):
    fix = {"left": "fraction between 0 and 1", "shape": "'left half'", "width": "between 8 and 8192"}[name]
    with expect(comfy, "SettingError", name, fix, problem):
        region_node(comfy, **{name: value})


def test_region_node_bad_image(comfy):
    with expect(comfy, "ImageInputError", "image", "'Split Image with Alpha'", "4 channels"):
        region_node(comfy, image=images(1, 64, 64, c=4))


# =========================================================================== P3S Adapter Loader / Save


@pytest.fixture(scope="module")
def p3s_folder(comfy):
    return Path(comfy.base) / "models" / "p3s"


@pytest.fixture(scope="module")
def good_file(comfy, tiny_adapter, p3s_folder):
    """A complete small adapter file; the bad files below are made from it."""
    adapter_mod = comfy.core("adapter")
    path = adapter_mod.save_adapter(tiny_adapter, p3s_folder / "bad_inputs_good.safetensors")
    with torch.inference_mode():
        comfy.node("P3SAdapterLoader")().load(path.name)  # loads: the refusals below are about the damage
    return path


def rewrite(safe_io, good: Path, name: str, meta_update=None, drop_first=False, reshape_all=False,
            nan_first=False, add=None) -> str:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(good), "pt") as f:
        meta = dict(f.metadata())
    meta.update(meta_update or {})
    tensors = load_file(str(good))
    if drop_first:
        del tensors[sorted(tensors)[0]]
    if reshape_all:
        tensors = {k: torch.zeros(1) for k in tensors}
    if nan_first:
        first = sorted(tensors)[0]
        tensors[first] = tensors[first].clone().reshape(-1).index_fill_(0, torch.tensor([0]), float("nan")).reshape(
            tensors[first].shape)
    tensors.update(add or {})
    safe_io.atomic_save_safetensors(tensors, good.parent / name, meta)
    return name


class _Trap:
    """Unpickling this object would create ``marker`` (the test checks that it never appears)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def bad_adapter_files(safe_io, good: Path, tmp: Path) -> dict:
    """name -> (problem, fix) of each damaged adapter written next to ``good`` (``safe_io``: the
    p3s_core.safe_io module; the server test reuses this with its own models folder)."""
    folder = good.parent
    raw = good.read_bytes()
    out = {}
    (folder / "bad_truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    out["bad_truncated.safetensors"] = ("the file is truncated", "re-train")
    (folder / "bad_text.safetensors").write_text("this is a text file, not an adapter\n" * 4)
    out["bad_text.safetensors"] = ("not a safetensors file", "safetensors adapter saved by the P3S Trainer")
    for zipped in (True, False):
        name = f"bad_pickle_{'zip' if zipped else 'legacy'}.safetensors"
        torch.save({"encoder.to_q.weight": torch.zeros(2), "trap": _Trap(tmp / f"unpickled_{name}")},
                   folder / name, _use_new_zipfile_serialization=zipped)
        out[name] = ("pickle / PyTorch checkpoint", "use a .safetensors adapter")
    out[rewrite(safe_io, good, "bad_sdxl_family.safetensors", {"base_family": "sdxl"})] = (
        "for base model family 'sdxl'", "trained on an SD1.5 model")
    out[rewrite(safe_io, good, "bad_newer_format.safetensors", {"p3s_format_version": "3"})] = (
        "made by a newer P3S version", "update the pack")
    out[rewrite(safe_io, good, "bad_missing_tensor.safetensors", drop_first=True)] = (
        "1 tensors are missing", "the file is incomplete")
    out[rewrite(safe_io, good, "bad_wrong_shapes.safetensors", reshape_all=True)] = (
        "have the wrong shape", "re-train")
    safe_io.atomic_save_safetensors({"lora_unet_down.weight": torch.zeros(4)}, folder / "bad_a_lora.safetensors", {})
    out["bad_a_lora.safetensors"] = ("not a P3S adapter", "adapter saved by the P3S Trainer")
    # one byte of a metadata value turned into invalid UTF-8 (a damaged disk or download)
    corrupt = bytearray(raw)
    at = raw.index(b'"config":"') + len(b'"config":"') + 3
    corrupt[at] = 0xFF
    (folder / "bad_corrupt_metadata.safetensors").write_bytes(bytes(corrupt))
    out["bad_corrupt_metadata.safetensors"] = ("the safetensors header (tensor list and metadata) is corrupted",
                                               "re-save or re-train the adapter")
    # a stored reference (issue 12) cut short, or of shapes no SD1.5 latent / CLIP grid has
    ref = {"reference.latent": torch.zeros(1, 4, 8, 8), "reference.clip_hidden": torch.zeros(1, 257, 16)}
    out[rewrite(safe_io, good, "bad_reference_incomplete.safetensors",
                add={"reference.latent": ref["reference.latent"]})] = (
        "its stored reference is incomplete or unknown", "re-train the adapter")
    out[rewrite(safe_io, good, "bad_reference_shapes.safetensors",
                add={**ref, "reference.latent": torch.zeros(2, 3, 8, 8)})] = (
        "its stored reference has shapes (2, 3, 8, 8) / (1, 257, 16)", "re-train the adapter")
    out[rewrite(safe_io, good, "bad_nan_weights.safetensors", nan_first=True)] = (
        "holds NaN or infinite weights in 1 tensors", "use an earlier save or re-train with a lower learning_rate")
    return out


@pytest.fixture(scope="module")
def bad_files(comfy, good_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("unpickle_markers")
    return tmp, bad_adapter_files(comfy.core("safe_io"), good_file, tmp)


BAD_FILE_NAMES = ["bad_truncated.safetensors", "bad_text.safetensors", "bad_pickle_zip.safetensors",
                  "bad_pickle_legacy.safetensors", "bad_sdxl_family.safetensors", "bad_newer_format.safetensors",
                  "bad_missing_tensor.safetensors", "bad_wrong_shapes.safetensors", "bad_a_lora.safetensors",
                  "bad_corrupt_metadata.safetensors", "bad_reference_incomplete.safetensors",
                  "bad_reference_shapes.safetensors"]


@pytest.mark.parametrize("name", BAD_FILE_NAMES)
def test_adapter_loader_refuses_damaged_file(comfy, bad_files, monkeypatch, name):
    tmp, table = bad_files
    problem, fix = table[name]
    calls = []
    # refused from the header: no tensor data read (the loader's only tensor reader is a spy)
    forbid(monkeypatch, comfy.core("adapter"), "read_safetensors_tensors", calls)
    with expect(comfy, "AdapterFileError", "adapter_name", fix, problem) as info:
        with torch.inference_mode():
            comfy.node("P3SAdapterLoader")().load(name)
    assert f"'{name}'" in str(info.value)
    assert calls == []
    assert not any(tmp.iterdir()), "a pickle was unpickled"


def test_adapter_loader_refuses_non_finite_weights(comfy, bad_files):
    """NaN weights are only visible in the data: they are read, checked, and no adapter comes out."""
    tmp, table = bad_files
    name = "bad_nan_weights.safetensors"
    problem, fix = table[name]
    with expect(comfy, "AdapterFileError", "adapter_name", fix, problem) as info:
        with torch.inference_mode():
            comfy.node("P3SAdapterLoader")().load(name)
    assert f"'{name}'" in str(info.value)


def test_adapter_loader_missing_file_lists_folders(comfy, p3s_folder):
    with expect(comfy, "AdapterFileError", "adapter_name", "put the .safetensors file in one of those folders",
                "was not found; searched: ") as info:
        comfy.node("P3SAdapterLoader")().load("no_such_adapter.safetensors")
    assert str(p3s_folder) in str(info.value)


@pytest.mark.parametrize("name", ["../escape.safetensors", "sub/x.safetensors", "..\\x.safetensors",
                                  ".hidden.safetensors", "C:evil.safetensors", ""])
def test_adapter_loader_name_with_path(comfy, name):
    with expect(comfy, "AdapterFileError", "adapter_name", "use a simple name", "not a plain file name"):
        comfy.node("P3SAdapterLoader")().load(name)


@pytest.fixture
def nothing_written(p3s_folder):
    before = files_under(p3s_folder)
    yield
    assert files_under(p3s_folder) == before


@pytest.mark.parametrize("name", ["../escape", "sub/dir/x", "..\\x", ".hidden", "a:b", "bad\nname", "   "])
def test_adapter_save_name_with_path(comfy, tiny_adapter, nothing_written, name):
    with expect(comfy, "AdapterFileError", "name", "use a simple name", "not a plain file name"):
        with torch.inference_mode():
            comfy.node("P3SAdapterSave")().save(tiny_adapter, name)


WINDOWS_BAD_NAMES = {
    "con": "reserved device name on Windows", "NUL.safetensors": "reserved device name on Windows",
    "com1": "reserved device name on Windows", "Lpt9.tar": "reserved device name on Windows",
    "my_dog.": "ends with a dot", "my_dog ": "ends with a space", " my_dog": "starts or ends with a space",
    "a?b": "contains ?", "a<b>": "contains < >", 'say "hi"': 'contains "', "a|b": "contains |", "a*": "contains *",
}


@pytest.mark.parametrize("name", list(WINDOWS_BAD_NAMES))
def test_adapter_save_name_invalid_on_windows(comfy, tiny_adapter, nothing_written, name):
    """Refused on every platform, so a workflow made on Linux also saves on Windows and macOS."""
    with expect(comfy, "AdapterFileError", "name", "use a simple name", WINDOWS_BAD_NAMES[name]):
        with torch.inference_mode():
            comfy.node("P3SAdapterSave")().save(tiny_adapter, name)


def test_adapter_save_names_valid_everywhere_are_accepted(comfy, tiny_adapter, p3s_folder):
    """The positive control: names close to the refused ones save (and load) fine."""
    for name in ("console", "com10", "nullable.v2", "my dog", "über_hund"):
        with torch.inference_mode():
            out = comfy.node("P3SAdapterSave")().save(tiny_adapter, name)
        assert out["result"] == (f"{name}.safetensors",)
        path = p3s_folder / f"{name}.safetensors"
        assert path.is_file()
        path.unlink()


def test_adapter_save_refuses_non_finite_weights(comfy, tiny_adapter, nothing_written):
    import copy

    diverged = copy.deepcopy(tiny_adapter)
    with torch.no_grad():
        diverged.encoder.to_q.weight[0, 0] = float("inf")
    with expect(comfy, "AdapterFileError", "adapter", "lower learning_rate",
                "holds NaN or infinite weights in 1 tensors: encoder.to_q.weight"):
        with torch.inference_mode():
            comfy.node("P3SAdapterSave")().save(diverged, "diverged")


def test_adapter_save_name_too_long(comfy, tiny_adapter, nothing_written):
    with expect(comfy, "AdapterFileError", "name", "shorter name", "at most 200"):
        with torch.inference_mode():
            comfy.node("P3SAdapterSave")().save(tiny_adapter, "x" * 240)


def test_adapter_save_input_is_not_an_adapter(comfy, nothing_written, sd15):
    with expect(comfy, "AdapterFileError", "adapter", "P3S Adapter Loader or P3S Trainer", "got a ModelPatcher"):
        with torch.inference_mode():
            comfy.node("P3SAdapterSave")().save(sd15.model, "not_an_adapter")


# =========================================================================== P3S Trainer (its own checks)


@pytest.fixture
def train_args(sd15, clip_vision, monkeypatch, p3s_folder):
    """Good trainer inputs; each test makes one bad. No encoding may start, no file may appear."""
    calls = []
    forbid(monkeypatch, sd15.vae, "encode", calls)
    forbid(monkeypatch, clip_vision, "encode_image", calls)
    before = files_under(p3s_folder)
    yield dict(model=sd15.model, clip=sd15.clip, vae=sd15.vae, clip_vision=clip_vision, images=images(2, 64, 64),
               prompt="a photo of sks dog", identifier="sks", epochs=1, learning_rate=1e-5, gamma=0.1,
               resolution=64, seed=0, save_name="bad_inputs_never_written", save_every=0)
    assert calls == []
    assert files_under(p3s_folder) == before


def train(comfy, args, **kw):
    with torch.inference_mode():
        return comfy.node("P3STrainer")().train(**dict(args, **kw))


@pytest.mark.parametrize("mask,problem,fix", [(torch.ones(2, 32, 32), "differs from the image size", "same images"),
                                              (torch.ones(3, 64, 64), "3 masks for 2 images", "one mask per image")])
def test_trainer_mask_does_not_fit(comfy, train_args, mask, problem, fix):
    with expect(comfy, "ImageInputError", "mask", fix, problem):
        train(comfy, train_args, mask=mask)


def test_trainer_prompt_too_long(comfy, train_args):
    with expect(comfy, "SettingError", "prompt", "'a photo of sks dog'", "characters long (at most 10,000)"):
        train(comfy, train_args, prompt="a photo of sks dog " * 600)


def test_trainer_prompt_without_identifier(comfy, train_args):
    with expect(comfy, "TrainingConfigError", "prompt", "a photo of sks dog", "does not contain the identifier"):
        train(comfy, train_args, prompt="a photo of a dog")


@pytest.mark.parametrize("value", [0.0, float("nan")])
def test_trainer_learning_rate_not_positive(comfy, train_args, value):
    with expect(comfy, "TrainingConfigError", "learning_rate", "1e-5", "not a finite number > 0"):
        train(comfy, train_args, learning_rate=value)


def test_trainer_save_name_with_path(comfy, train_args):
    with expect(comfy, "AdapterFileError", "save_name", "use a simple name", "not a plain file name"):
        train(comfy, train_args, save_name="../../outside")


def test_trainer_model_not_sd15(comfy, train_args, other_models):
    with expect(comfy, "ModelMismatchError", "model", "load an SD1.5 checkpoint", "the model is SDXL"):
        train(comfy, train_args, model=other_models["sdxl"])


def test_trainer_clip_vision_not_vit_l14(comfy, train_args, other_clip_visions):
    with expect(comfy, "ModelMismatchError", "clip_vision", "clip-vit-large-patch14", "not OpenAI CLIP ViT-L/14"):
        train(comfy, train_args, clip_vision=other_clip_visions["ViT-H/14-shaped"])


@pytest.mark.parametrize("name,value", [("ac_reading", "printed"), ("reference_pairing", "random photo"),
                                        ("gradient_checkpointing", "sometimes"), ("copy_layout", "half"),
                                        ("enhancement", "both")])
def test_trainer_choice_not_in_list(comfy, train_args, name, value):
    fix = {"ac_reading": "'mass'", "reference_pairing": "'other photo'", "gradient_checkpointing": "auto",
           "copy_layout": "'encoder'", "enhancement": "'self-attention only'"}[name]
    with expect(comfy, "TrainingConfigError", name, fix, "is not one of"):
        train(comfy, train_args, **{name: value})


# =========================================================================== IMAGE values outside 0..1
# Every node with an IMAGE input refuses values outside 0..1 (beyond float rounding) before any work,
# with a fix that fits the range seen; applying that fix gives an IMAGE the same check accepts.


def upscaled(comfy, b, h, w, method):
    """The real core 'Upscale Image' node (2x): bicubic overshoots 0..1 at the sharp edges of a noisy photo."""
    with torch.inference_mode():
        return comfy.node("ImageScale")().upscale(images(b, h // 2, w // 2, seed=5), method, w, h, "disabled")[0]


def bicubic_overshoot(comfy, b, h, w):
    out = upscaled(comfy, b, h, w, "bicubic")
    assert float(out.min()) < -0.05 and float(out.max()) > 1.05, "no overshoot: the row would test nothing"
    return out


# case -> (make bad IMAGE, problem, fix text, make the fixed IMAGE from the bad one / the same shape)
OUT_OF_RANGE = {
    "0_255": (lambda comfy, b, h, w: images(b, h, w) * 255, "outside 0..1", "divide the values by 255",
              lambda comfy, bad: bad / 255),
    "minus1_1": (lambda comfy, b, h, w: images(b, h, w) * 2 - 1, "outside 0..1", "(x + 1) / 2",
                 lambda comfy, bad: (bad + 1) / 2),
    "overshoot": (bicubic_overshoot, "outside 0..1", "pick 'bilinear', 'area' or 'lanczos'",
                  lambda comfy, bad: upscaled(comfy, bad.shape[0], bad.shape[1], bad.shape[2], "bilinear")),
}
# node -> (input name, IMAGE batch shape, fixtures that watch for work, call with the IMAGE)
IMAGE_INPUTS = {
    "point_selector": ("image", (2, H, W), ("no_temp_files",),
                       lambda comfy, fx, img: select(comfy, img, points_store=json.dumps(STATE))),
    "rngr": ("image", (2, H, W), ("points2", "clip_vision", "clip_must_not_run"),
             lambda comfy, fx, img: rngr(comfy, img, fx["points2"], fx["clip_vision"])),
    "region": ("image", (1, 64, 64), (), lambda comfy, fx, img: region_node(comfy, image=img)),
    "injector": ("reference", (1, 64, 64), ("inject_args",),
                 lambda comfy, fx, img: inject(comfy, fx["inject_args"], reference=img)),
    "trainer": ("images", (2, 64, 64), ("train_args",), lambda comfy, fx, img: train(comfy, fx["train_args"], images=img)),
}


@pytest.mark.parametrize("case", list(OUT_OF_RANGE))
@pytest.mark.parametrize("node", list(IMAGE_INPUTS))
def test_image_values_outside_0_1(comfy, request, node, case):
    input_name, shape, watchers, call = IMAGE_INPUTS[node]
    make, problem, fix, fixed = OUT_OF_RANGE[case]
    fx = {name: request.getfixturevalue(name) for name in watchers}  # spies: no CLIP / VAE / temp file / save
    bad = make(comfy, *shape)
    with expect(comfy, "ImageInputError", input_name, fix, problem) as info:
        call(comfy, fx, bad)
    lo, hi = float(bad.min()), float(bad.max())
    assert f"span {lo:.4g}..{hi:.4g}" in str(info.value)
    assert node_common(comfy).check_image_batch(fixed(comfy, bad)) == tuple(bad.shape)  # the fix works


def test_catalogue_lists_every_test():
    """docs/ERRORS.md names each test of this file, and each test it names exists here."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "ERRORS.md").read_text()
    import re

    every = {name for name in globals() if name.startswith("test_")}
    rows = every - {"test_catalogue_lists_every_test", "test_positive_controls_pass_the_checks",
                    "test_adapter_save_names_valid_everywhere_are_accepted"}
    named = set(re.findall(r"`(test_[a-z0-9_]+)", doc))
    assert rows - named == set(), f"tests missing from docs/ERRORS.md: {sorted(rows - named)}"
    assert named - every == set(), f"docs/ERRORS.md names unknown tests: {sorted(named - every)}"
    assert os.path.basename(__file__) in doc
    rows = [line for line in doc.splitlines() if line.startswith("| ") and "`test_" in line]
    stated = re.search(r"The catalogue has \*\*(\d+) rows\*\*", doc)
    assert stated and int(stated.group(1)) == len(rows), "the row count stated in docs/ERRORS.md is stale"
