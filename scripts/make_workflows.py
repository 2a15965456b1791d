"""Write the example workflows in ``workflows/`` (UI format, loadable in the ComfyUI frontend).

Widget values are laid out from the nodes' own ``INPUT_TYPES`` in the real ComfyUI (in process), so
the files match the node definitions; ``tests/integration/test_workflows.py`` checks that they still
do and runs each one through the real frontend and server. Run through the venv:
``P3S_COMFYUI=... P3S_RANDOM_MODELS=... python scripts/make_workflows.py`` (scripts/test.sh exports them).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

OUT = harness.REPO / "workflows"
CKPT = "v1-5-pruned-emaonly.safetensors"
CLIPV = "clip-vit-large-patch14.safetensors"
CNET = "control_v11p_sd15_canny.safetensors"
PHOTO = "p3s_two_dogs.png"
ADAPTER = "p3s_example_dog"
PROMPT = "a photo of sks dog"
POINTS = {"version": 1, "width": 512, "height": 384,
          "images": [{"positive": [[140, 215], [205, 180]], "negative": [[360, 228]]}]}
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


class Graph:
    def __init__(self, defs):
        self.defs, self.nodes, self.links, self.groups = defs, [], [], []

    def _spec(self, type_):
        it = self.defs[type_].INPUT_TYPES()
        return list(it.get("required", {}).items()) + list(it.get("optional", {}).items())

    def node(self, type_, pos, values=None, size=(320, 160), title=None):
        values = dict(values or {})
        inputs, widgets = [], []
        if type_ in ("Note", "MarkdownNote"):
            widgets = [values["text"]]
            outs = []
        else:
            for name, spec in self._spec(type_):
                kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
                is_widget = isinstance(kind, list) or (kind in WIDGET_TYPES and not opts.get("forceInput"))
                if is_widget:
                    default = opts.get("default", kind[0] if isinstance(kind, list) and kind else None)
                    widgets.append(values.pop(name, default))
                    if kind == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
                        widgets.append("fixed")
                    if opts.get("image_upload"):
                        widgets.append("image")
                else:
                    inputs.append({"name": name, "type": kind, "link": None})
            if values:
                raise KeyError(f"{type_}: unknown widget(s) {sorted(values)}")
            cls = self.defs[type_]
            names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
            outs = [{"name": n, "type": t, "links": [], "slot_index": i}
                    for i, (n, t) in enumerate(zip(names, cls.RETURN_TYPES))]
        nid = len(self.nodes) + 1
        n = {"id": nid, "type": type_, "pos": list(pos), "size": list(size), "flags": {}, "order": nid - 1,
             "mode": 0, "inputs": inputs, "outputs": outs, "properties": {"Node name for S&R": type_},
             "widgets_values": widgets}
        if title:
            n["title"] = title
        if type_ in ("Note", "MarkdownNote"):
            n["color"], n["bgcolor"] = "#432", "#653"
        self.nodes.append(n)
        return nid

    def link(self, src, src_slot, dst, dst_name):
        a = self.nodes[src - 1]
        b = self.nodes[dst - 1]
        slot = [i for i, inp in enumerate(b["inputs"]) if inp["name"] == dst_name]
        if not slot:
            raise KeyError(f"{b['type']} has no input {dst_name}")
        lid = len(self.links) + 1
        ty = a["outputs"][src_slot]["type"]
        a["outputs"][src_slot]["links"].append(lid)
        b["inputs"][slot[0]]["link"] = lid
        self.links.append([lid, src, src_slot, dst, slot[0], ty])

    def connect(self, *edges):
        for src, slot, dst, name in edges:
            self.link(src, slot, dst, name)

    def group(self, title, box, color="#3f789e"):
        self.groups.append({"title": title, "bounding": list(box), "color": color, "font_size": 24, "flags": {}})

    def note(self, pos, text, size=(380, 200)):
        return self.node("Note", pos, {"text": text}, size=size)

    def dump(self, name, title):
        wf = {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
              "links": self.links, "groups": self.groups, "config": {},
              "extra": {"ds": {"scale": 0.75, "offset": [40, 40]}, "p3s": {"title": title}}, "version": 0.4}
        (OUT / f"{name}.json").write_text(json.dumps(wf, indent=1) + "\n")


def checkpoint(g, pos):
    return g.node("CheckpointLoaderSimple", pos, {"ckpt_name": CKPT}, size=(320, 100))


def select_and_clean(g, x, y):
    """Load Image -> P3S Point Selector -> RNGR Mask + Inpaint (+ previews). Returns (rngr, clipv, photo)."""
    photo = g.node("LoadImage", (x, y), {"image": PHOTO}, size=(300, 360))
    sel = g.node("P3SPointSelector", (x + 330, y), {"points_store": json.dumps(POINTS)}, size=(420, 420))
    clipv = g.node("CLIPVisionLoader", (x + 330, y + 450), {"clip_name": CLIPV}, size=(320, 60))
    rngr = g.node("P3SRNGRMaskInpaint", (x + 780, y), {}, size=(320, 240))
    prev = g.node("PreviewImage", (x + 780, y + 280), {}, size=(320, 260), title="RNGR preview")
    g.connect(
        (photo, 0, sel, "image"),
        (photo, 0, rngr, "image"),
        (sel, 0, rngr, "points"),
        (clipv, 0, rngr, "clip_vision"),
        (rngr, 3, prev, "images"),
    )
    return rngr, clipv, photo


def trainer(g, x, y, ckpt, clipv, rngr):
    t = g.node("P3STrainer", (x, y), {"prompt": PROMPT, "identifier": "sks", "save_name": ADAPTER}, size=(360, 420))
    loss = g.node("PreviewImage", (x + 390, y), {}, size=(320, 260), title="loss curve")
    g.connect(
        (ckpt, 0, t, "model"),
        (ckpt, 1, t, "clip"),
        (ckpt, 2, t, "vae"),
        (clipv, 0, t, "clip_vision"),
        (rngr, 0, t, "images"),
        (rngr, 1, t, "mask"),
        (t, 2, loss, "images"),
    )
    return t


def generate(g, x, y, ckpt, adapter_src, controlnet=False, cn_image=None):
    """Scheduler -> Injector -> KSampler (DDIM 50, CFG 7.5) -> Save Image. The Injector takes the
    cleaned reference stored in the adapter (no reference photo, VAE or CLIP vision connected)."""
    sched = g.node("P3STimestepWeightScheduler", (x, y), {}, size=(320, 340))
    plot = g.node("PreviewImage", (x, y + 370), {}, size=(320, 200), title="schedule")
    inj = g.node("P3SConditionInjector", (x + 350, y), {}, size=(340, 400))
    pos = g.node("CLIPTextEncode", (x + 350, y + 430), {"text": "a photo of sks dog on the beach"}, size=(340, 120))
    neg = g.node("CLIPTextEncode", (x + 350, y + 580), {"text": "blurry, low quality"}, size=(340, 120))
    latent = g.node("EmptyLatentImage", (x + 720, y + 330), {"width": 512, "height": 512, "batch_size": 1}, size=(300, 110))
    ks = g.node("KSampler", (x + 720, y), {"seed": 42, "steps": 50, "cfg": 7.5, "sampler_name": "ddim",
                                           "scheduler": "ddim_uniform"}, size=(300, 300))
    dec = g.node("VAEDecode", (x + 1050, y), {}, size=(200, 60))
    save = g.node("SaveImage", (x + 1050, y + 100), {"filename_prefix": "p3s/p3s"}, size=(320, 340))
    g.connect(
        (sched, 1, plot, "images"),
        (ckpt, 0, inj, "model"),
        (adapter_src[0], adapter_src[1], inj, "adapter"),
        (sched, 0, inj, "schedule"),
        (ckpt, 1, pos, "clip"),
        (ckpt, 1, neg, "clip"),
        (inj, 0, ks, "model"),
    )
    if controlnet:
        cn = g.node("ControlNetLoader", (x + 350, y + 730), {"control_net_name": CNET}, size=(340, 60))
        canny = g.node("Canny", (x + 350, y + 820), {"low_threshold": 0.4, "high_threshold": 0.8}, size=(340, 90))
        apply = g.node("ControlNetApplyAdvanced", (x + 720, y + 470),
                       {"strength": 0.8, "start_percent": 0.0, "end_percent": 0.8}, size=(300, 170))
        g.connect(
            (cn_image[0], cn_image[1], canny, "image"),
            (pos, 0, apply, "positive"),
            (neg, 0, apply, "negative"),
            (cn, 0, apply, "control_net"),
            (canny, 0, apply, "image"),
            (ckpt, 2, apply, "vae"),
            (apply, 0, ks, "positive"),
            (apply, 1, ks, "negative"),
        )
    else:
        g.connect(
            (pos, 0, ks, "positive"),
            (neg, 0, ks, "negative"),
        )
    g.connect(
        (latent, 0, ks, "latent_image"),
        (ks, 0, dec, "samples"),
        (ckpt, 2, dec, "vae"),
        (dec, 0, save, "images"),
    )


def loaders(g, photo=False):
    """Checkpoint and trained adapter of the generate workflows (+ the photo, for ControlNet's edges)."""
    ckpt = checkpoint(g, (0, 0))
    adapter = g.node("P3SAdapterLoader", (0, 140), {"adapter_name": f"{ADAPTER}.safetensors"}, size=(320, 60))
    ref = g.node("LoadImage", (0, 230), {"image": PHOTO}, size=(300, 340), title="layout photo") if photo else None
    return ckpt, adapter, ref


SECOND_ADAPTER = "p3s_example_cat"
TWO_PROMPT = "a photo of sks dog and zwx cat sitting side by side on a sofa"


def two_subjects(g):
    """Two adapters, two regions (left / right half), one prompt naming both identifiers (issue 16)."""
    ckpt = checkpoint(g, (0, 0))
    clipv = g.node("CLIPVisionLoader", (0, 140), {"clip_name": CLIPV}, size=(320, 60))
    sched = g.node("P3STimestepWeightScheduler", (0, 240), {}, size=(320, 340))
    x = 360
    injectors = []
    for i, (adapter, side, title) in enumerate([(ADAPTER, "left half", "subject 1: sks dog"),
                                               (SECOND_ADAPTER, "right half", "subject 2: zwx cat")]):
        y = i * 620
        ad = g.node("P3SAdapterLoader", (x, y), {"adapter_name": f"{adapter}.safetensors"}, size=(320, 60),
                    title=f"{title}: adapter")
        ref = g.node("LoadImage", (x, y + 90), {"image": PHOTO}, size=(300, 340), title=f"{title}: cleaned reference")
        reg = g.node("P3SRegion", (x + 330, y), {"shape": side, "width": 512, "height": 512}, size=(320, 300),
                     title=f"{title}: region")
        prev = g.node("PreviewImage", (x + 330, y + 330), {}, size=(320, 250), title=f"{title}: region preview")
        inj = g.node("P3SConditionInjector", (x + 680, y), {}, size=(340, 400), title=f"{title}: injector")
        g.connect(
            (reg, 1, prev, "images"),
            ((injectors[-1] if injectors else ckpt), 0, inj, "model"),
            (ad, 0, inj, "adapter"),
            (ref, 0, inj, "reference"),
            (ckpt, 2, inj, "vae"),
            (clipv, 0, inj, "clip_vision"),
            (sched, 0, inj, "schedule"),
            (reg, 0, inj, "region"),
        )
        injectors.append(inj)
    x = 1400
    pos = g.node("CLIPTextEncode", (x, 0), {"text": TWO_PROMPT}, size=(340, 120))
    neg = g.node("CLIPTextEncode", (x, 150), {"text": "blurry, low quality"}, size=(340, 120))
    latent = g.node("EmptyLatentImage", (x, 300), {"width": 512, "height": 512, "batch_size": 1}, size=(300, 110))
    ks = g.node("KSampler", (x + 370, 0), {"seed": 42, "steps": 50, "cfg": 7.5, "sampler_name": "ddim",
                                           "scheduler": "ddim_uniform"}, size=(300, 300))
    dec = g.node("VAEDecode", (x + 700, 0), {}, size=(200, 60))
    save = g.node("SaveImage", (x + 700, 100), {"filename_prefix": "p3s/p3s_two_subjects"}, size=(320, 340))
    g.connect(
        (ckpt, 1, pos, "clip"),
        (ckpt, 1, neg, "clip"),
        (injectors[-1], 0, ks, "model"),
        (pos, 0, ks, "positive"),
        (neg, 0, ks, "negative"),
        (latent, 0, ks, "latent_image"),
        (ks, 0, dec, "samples"),
        (ckpt, 2, dec, "vae"),
        (dec, 0, save, "images"),
    )
    g.note((0, 620), "P3S: two selected subjects in one image.\n\nTrain one adapter per subject with "
           f"p3s_select_and_train (identifier sks for the dog, saved as {ADAPTER}; identifier zwx for the cat, "
           f"saved as {SECOND_ADAPTER}) and load each one's cleaned reference. Each Condition Injector gets its own "
           "region (P3S Region: left / right half; Solid Mask, Mask Composite or a painted Load Image MASK work too): "
           "outside its region the model attends exactly as the plain model, so the two subjects' features do not "
           "mix. The prompt names both identifiers. Paper settings: DDIM, 50 steps, CFG 7.5.", size=(320, 330))


def build(defs):
    OUT.mkdir(exist_ok=True)
    # 1. select and train
    g = Graph(defs)
    rngr, clipv, _ = select_and_clean(g, 0, 0)
    ckpt = checkpoint(g, (1130, 0))
    trainer(g, 1130, 140, ckpt, clipv, rngr)
    g.note((0, 540), "P3S, step 1: select and train.\n\n1. Load 3-5 photos of your subject (here one example photo with two look-alike dogs).\n"
           "2. In P3S Point Selector click the subject (green); right-click the look-alike distractor (red).\n"
           "3. RNGR Mask + Inpaint masks the subject with CLIP ViT-L/14 patch similarity and fills the distractor.\n"
           "4. P3S Trainer fine-tunes the adapter (paper: 60 epochs, lr 1e-5) and saves models/p3s/"
           f"{ADAPTER}.safetensors.\n\nThen open p3s_generate.")
    g.dump("p3s_select_and_train", "P3S: select and train")
    # 2. generate
    g = Graph(defs)
    ckpt, adapter, _ = loaders(g)
    generate(g, 360, 0, ckpt, (adapter, 0))
    g.note((0, 700), "P3S, step 2: generate.\n\nThe Condition Injector patches the MODEL with the adapter trained in "
           "p3s_select_and_train; the subject follows the prompt's identifier (sks). Paper settings: DDIM, 50 steps, "
           "CFG 7.5. The scheduler sets how strongly the subject is injected over the steps (Eq. 10). The adapter "
           "carries the cleaned reference it was trained on, so no photo is needed here; connect another cleaned "
           "photo (with VAE and CLIP vision) to the Injector's 'reference' to override it.")
    g.dump("p3s_generate", "P3S: generate")
    # 3. generate with ControlNet
    g = Graph(defs)
    ckpt, adapter, ref = loaders(g, photo=True)
    generate(g, 360, 0, ckpt, (adapter, 0), controlnet=True, cn_image=(ref, 0))
    g.note((0, 700), "P3S with ControlNet: the P3S patch lives on the MODEL, ControlNet on the conditioning; both "
           "act in the same KSampler. Here a Canny ControlNet keeps the reference's layout.")
    g.dump("p3s_generate_controlnet", "P3S: generate with ControlNet")
    # 4. one graph from clicks to images
    g = Graph(defs)
    rngr, clipv, _ = select_and_clean(g, 0, 0)
    ckpt = checkpoint(g, (1130, 0))
    t = trainer(g, 1130, 140, ckpt, clipv, rngr)
    generate(g, 1860, 0, ckpt, (t, 0))
    g.note((0, 540), "P3S from clicks to images in one graph: points -> mask + inpaint -> train -> inject -> sample. "
           "Training runs again only when its inputs change (ComfyUI caches node outputs).")
    g.dump("p3s_clicks_to_images", "P3S: from clicks to images")
    # 5. two subjects, two regions (issue 16)
    g = Graph(defs)
    two_subjects(g)
    g.dump("p3s_two_subjects", "P3S: two subjects in one image")


def main():
    base = harness.make_base_dir(Path(tempfile.mkdtemp(prefix="p3s_wf_")))
    nodes, _ = harness.boot_in_process(base)
    build(nodes.NODE_CLASS_MAPPINGS)
    print("\n".join(sorted(str(p) for p in OUT.glob("*.json"))))


if __name__ == "__main__":
    main()
