"""Draw a thumbnail per example workflow, and the pack's registry icon (Pillow only, deterministic).

ComfyUI lists a pack's example workflows (``workflows/*.json``, a legacy name of ``example_workflows/``
that ComfyUI 0.3.75 and 0.33 still read) in the template browser and serves the folder at
``/api/workflow_templates/<pack folder>/``; the frontend shows ``<name>.jpg`` beside each ``<name>.json``
as its thumbnail. Each thumbnail is the workflow's graph: its nodes at their positions (P3S nodes in
the pack's colour, titled with their display names from locales/en/nodeDefs.json) and its links.

    python scripts/make_workflow_thumbnails.py     # writes workflows/<name>.jpg and web/icon.png
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / "workflows"
ICON = REPO / "web" / "icon.png"
SIZE = (512, 384)
BG, NODE, P3S_NODE, TITLE_BAR, TEXT = (32, 32, 36), (58, 58, 64), (46, 84, 70), (24, 24, 28), (230, 230, 230)
LINK_COLOURS = {"MODEL": (180, 160, 255), "CLIP": (255, 210, 60), "VAE": (255, 110, 110), "IMAGE": (100, 180, 255),
                "MASK": (120, 220, 120), "CONDITIONING": (255, 170, 90), "LATENT": (255, 150, 200)}
LINK_DEFAULT = (160, 160, 160)


def _font(size: int):
    return ImageFont.load_default(size=size)


def display_names() -> dict:
    path = REPO / "locales" / "en" / "nodeDefs.json"
    return {k: v["display_name"] for k, v in json.loads(path.read_text(encoding="utf-8")).items()}


def render_workflow(workflow: dict, names: dict | None = None, size=SIZE) -> Image.Image:
    names = display_names() if names is None else names
    nodes = [n for n in workflow["nodes"] if n.get("type") not in ("Note", "MarkdownNote")] or workflow["nodes"]
    title_h = 30  # LiteGraph's title bar, above pos
    x0 = min(n["pos"][0] for n in nodes)
    y0 = min(n["pos"][1] - title_h for n in nodes)
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes)
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes)
    pad = 12
    scale = min((size[0] - 2 * pad) / (x1 - x0), (size[1] - 2 * pad) / (y1 - y0))
    ox = pad + ((size[0] - 2 * pad) - (x1 - x0) * scale) / 2
    oy = pad + ((size[1] - 2 * pad) - (y1 - y0) * scale) / 2

    def xy(x, y):
        return ox + (x - x0) * scale, oy + (y - y0) * scale

    img = Image.new("RGB", size, BG)
    d = ImageDraw.Draw(img)
    by_id = {n["id"]: n for n in nodes}
    for link in workflow.get("links", []):
        _, src, src_slot, dst, dst_slot, typ = link[:6]
        if src not in by_id or dst not in by_id:
            continue
        a, b = by_id[src], by_id[dst]
        p = xy(a["pos"][0] + a["size"][0], a["pos"][1] + 14 + 20 * src_slot)
        q = xy(b["pos"][0], b["pos"][1] + 14 + 20 * dst_slot)
        mid = (p[0] + q[0]) / 2
        d.line([p, (mid, p[1]), (mid, q[1]), q], fill=LINK_COLOURS.get(typ, LINK_DEFAULT), width=2)
    font = _font(max(9, min(14, int(13 * scale / 0.5))))
    for n in nodes:
        left, top = xy(n["pos"][0], n["pos"][1] - title_h)
        right, bottom = xy(n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
        p3s = str(n["type"]).startswith("P3S")
        d.rounded_rectangle([left, top, right, bottom], radius=5, fill=P3S_NODE if p3s else NODE,
                            outline=(120, 200, 160) if p3s else (90, 90, 96))
        bar = top + title_h * scale
        d.rectangle([left + 1, top + 1, right - 1, bar], fill=TITLE_BAR)
        title = n.get("title") or names.get(n["type"], n["type"])
        while title and d.textlength(title, font=font) > right - left - 8:
            title = title[:-2] + "…" if len(title) > 2 else ""
        d.text((left + 4, top + 2), title, fill=TEXT, font=font)
    return img


def render_icon(size: int = 256) -> Image.Image:
    """The registry icon: a subject (green point) beside a look-alike (red point), and 'P3S'."""
    img = Image.new("RGB", (size, size), BG)
    d = ImageDraw.Draw(img)
    u = size / 256
    d.rounded_rectangle([8 * u, 8 * u, 248 * u, 248 * u], radius=36 * u, fill=P3S_NODE, outline=(120, 200, 160), width=int(4 * u))
    for cx, colour in ((84, (60, 220, 110)), (172, (235, 70, 70))):
        d.ellipse([(cx - 38) * u, 60 * u, (cx + 38) * u, 136 * u], outline=(230, 230, 230), width=int(5 * u))
        d.ellipse([(cx - 12) * u, 86 * u, (cx + 12) * u, 110 * u], fill=colour)
    font = _font(int(72 * u))
    w = d.textlength("P3S", font=font)
    d.text(((size - w) / 2, 150 * u), "P3S", fill=TEXT, font=font)
    return img


def thumbnail_path(workflow_path: Path) -> Path:
    return workflow_path.with_suffix(".jpg")


def main() -> int:
    names = display_names()
    for wf in sorted(WORKFLOWS.glob("*.json")):
        out = thumbnail_path(wf)
        render_workflow(json.loads(wf.read_text(encoding="utf-8")), names).save(out, quality=88)
        print(out.relative_to(REPO))
    render_icon().save(ICON, optimize=True)
    print(ICON.relative_to(REPO))
    return 0


if __name__ == "__main__":
    sys.exit(main())
