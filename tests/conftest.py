"""Test harness: the real ComfyUI 0.3.75 in process, its real server, and its real frontend.

- ``comfy``: ComfyUI imported in this process (CPU), this pack loaded by ComfyUI's own
  custom-node loader from a ``custom_nodes/`` link; ``comfy.node(name)`` gives a node class.
- ``sd15``: the random-weight SD1.5 checkpoint loaded once per session (model, clip, vae).
- ``server``: the real server (``main.py --cpu``) on a free 127.0.0.1 port, stopped by PID.
- ``page``: the real frontend of that server in headless Chromium (Playwright, system chromium).

Tests using any of these are marked ``slow`` automatically; ``-m "not slow"`` runs the rest in
seconds. A missing ComfyUI, model or browser is an error, never a skip.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import harness  # noqa: E402

SLOW_FIXTURES = {"comfy": "comfy", "sd15": "comfy", "clip_vision": "comfy", "server": "server",
                 "browser": "browser", "page": "browser"}
CHROMIUM = os.environ.get("P3S_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--disable-dev-shm-usage"]


def pytest_collection_modifyitems(config, items):
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        kinds = {kind for name, kind in SLOW_FIXTURES.items() if name in used}
        if kinds:
            item.add_marker(pytest.mark.slow)
            for kind in kinds:
                item.add_marker(getattr(pytest.mark, kind))


def pytest_collection_finish(session):
    """Refuse a session that would hold the in-process ComfyUI's models and a server's at once.

    ``scripts/test.sh`` runs any selection in two sessions (tests not marked server/browser, then those);
    a direct ``pytest`` call that mixes them would need memory for two SD1.5s (about 7 GB each) and,
    on a 24 GB machine, be killed. Fast tests (not slow) mix with either. P3S_ONE_SESSION=1 allows it
    (a machine with memory to spare)."""
    if session.config.option.collectonly or os.environ.get("P3S_ONE_SESSION") == "1":
        return
    served = [i for i in session.items if i.get_closest_marker("server") or i.get_closest_marker("browser")]
    served_ids = {i.nodeid for i in served}
    heavy = [i for i in session.items if i.get_closest_marker("slow") and i.nodeid not in served_ids]
    if served and heavy:
        raise pytest.UsageError(
            f"this selection holds {len(heavy)} in-process ComfyUI test(s) (e.g. {heavy[0].nodeid}) and "
            f"{len(served)} server/browser test(s) (e.g. {served[0].nodeid}) in one session: both SD1.5s would "
            "be in memory at once. Run it through scripts/test.sh (two sessions), or add -m \"not server and "
            "not browser\" / -m \"server or browser\" (P3S_ONE_SESSION=1 allows one session).")


class InProcessComfy(SimpleNamespace):
    def node(self, name: str):
        return self.nodes.NODE_CLASS_MAPPINGS[name]

    def core(self, module: str):
        """A ``p3s_core`` module as the loaded pack sees it (same classes the nodes use)."""
        import importlib

        return importlib.import_module(f"{self.pack.__name__}.p3s_core.{module}")

    def injected_layers(self, sd15, clip_vision, adapter, image, prompt: str, size: int, seed: int = 5):
        """One KSampler step (ddim, CFG 7.5) of the Condition Injector's MODEL with ``adapter`` and
        reference ``image``; returns ``(samples, keys)``: the keys of the self-attention layers
        whose K/V held the extra copy tokens (seen by an attn1 patch chained after P3S's)."""
        import torch

        seen = set()
        layer_key = self.core("copy_unet").layer_key

        def probe(n, context, value, extra_options):
            if context.shape[1] == 2 * n.shape[1]:
                seen.add(layer_key(extra_options["block"]))
            return n, context, value

        enc = self.node("CLIPTextEncode")()
        with torch.inference_mode():
            pos, neg = enc.encode(sd15.clip, prompt)[0], enc.encode(sd15.clip, "")[0]
            patched = self.node("P3SConditionInjector")().inject(sd15.model, adapter, image, sd15.vae, clip_vision,
                                                                 lam=0.2, strength=1.0, apply_to="cond and uncond")[0]
            probed = patched.clone()
            probed.set_model_attn1_patch(probe)
            latent = self.node("EmptyLatentImage")().generate(size, size, 1)[0]
            out = self.node("KSampler")().sample(probed, seed, 1, 7.5, "ddim", "normal", pos, neg, latent,
                                                 denoise=1.0)[0]["samples"]
        return out, seen


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    base = harness.make_base_dir(tmp_path_factory.mktemp("comfy_inprocess"))
    nodes, pack = harness.boot_in_process(base)
    import folder_paths

    return InProcessComfy(dir=harness.comfyui_dir(), base=base, nodes=nodes, pack=pack, folder_paths=folder_paths)


@pytest.fixture(scope="session")
def sd15(comfy):
    """(MODEL, CLIP, VAE) of the random SD1.5, loaded once for the session."""
    import torch

    with torch.inference_mode():
        model, clip, vae = comfy.node("CheckpointLoaderSimple")().load_checkpoint("p3s_random_sd15.safetensors")[:3]
    return SimpleNamespace(model=model, clip=clip, vae=vae)


@pytest.fixture(scope="session")
def clip_vision(comfy):
    import torch

    with torch.inference_mode():
        return comfy.node("CLIPVisionLoader")().load_clip("p3s_random_clip_vit_l14.safetensors")[0]


@pytest.fixture(scope="session")
def reference():
    """A non-square reference photo (80x64) with a coloured subject block, for the injector tests."""
    import torch

    g = torch.Generator().manual_seed(3)
    img = torch.rand(1, 80, 64, 3, generator=g)
    img[:, 20:60, 16:48, :] = torch.tensor([0.8, 0.5, 0.2])
    return img


@pytest.fixture(scope="session")
def active_adapter(comfy, sd15):
    """An SD1.5 adapter initialised from the base UNet, with non-zero zero-convs (as after training);
    built once per session (read-only: the tests that use it never train it)."""
    import torch

    adapter_mod, copy_mod, backend = comfy.core("adapter"), comfy.core("copy_unet"), comfy.core("comfyui_engine")
    with torch.inference_mode(False):
        sd = {k: v.detach().clone() for k, v in backend.base_unet_state_dict(sd15.model).items()}
        # with the cross-attention enhancement (opt-in), so every test through this adapter runs its path
        adapter = adapter_mod.new_adapter(copy_mod.CopyUNetConfig.sd15(), sd, seed=0, enhancement="cross")
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for conv in adapter.copy.zero_convs.values():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.05)
    return adapter.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    base = harness.make_base_dir(tmp_path_factory.mktemp("comfy_server"))
    srv = harness.ComfyServer(base=base).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no chromium at {CHROMIUM}: scripts/setup.sh installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


# The displays of the frontend's graph: the classic LiteGraph canvas, and the Vue nodes ("Nodes 2.0",
# setting `Comfy.VueNodes.Enabled`; experimental in frontend 1.32, a regular setting in 1.49).
DISPLAYS = ("classic", "vue")

# The page is ready for a user once the frontend has finished starting. Frontend 1.49 exposes
# `window.app` (and the graph) *before* it restores the start-up workflow, and until then its
# full-screen loading mask (PrimeVue BlockUI, shown while `app.extensionManager.spinner` is true)
# takes every click; frontend 1.32 cleared the spinner before exposing `window.app`. A test that
# builds or clicks earlier loses its graph to the restore or its clicks to the mask.
PAGE_READY = """() => window.app && window.app.graph && window.LiteGraph
  && Object.keys(LiteGraph.registered_node_types).length > 50
  && window.app.extensionManager && window.app.extensionManager.spinner === false
  && !document.querySelector('.p-blockui-mask')"""


@pytest.fixture
def page(request, browser, server):
    """The real frontend, loaded and ready for input; console errors collected in ``page.errors``.

    ``page.display`` is "classic" (default) or "vue"; parametrize ``page`` indirectly with
    ``DISPLAYS`` to run a test on both."""
    display = getattr(request, "param", "classic")
    assert display in DISPLAYS, display
    server.post("/api/settings", {"Comfy.TutorialCompleted": True, "Comfy.VueNodes.Enabled": display == "vue"})
    ctx = browser.new_context(viewport={"width": 1600, "height": 1000})
    pg = ctx.new_page()
    pg.errors = []
    pg.display = display
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.goto(server.url, wait_until="domcontentloaded", timeout=120_000)
    pg.wait_for_function(PAGE_READY, timeout=120_000)
    assert pg.evaluate("() => LiteGraph.vueNodesMode === true") == (display == "vue"), display
    # The frontend in the page is the one scripts/setup.sh installed (the pinned --frontend, if any).
    want = os.environ.get("P3S_FRONTEND_VERSION")
    if want and want != "unknown":
        assert pg.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__") == want
    try:
        yield pg
    finally:
        ctx.close()
