"""Write what ComfyUI's frontend shows about the nodes, from one source: the node classes themselves.

* ``locales/en/nodeDefs.json``: display name, description, and the name and tooltip of every input and
  output, per node. ComfyUI serves a pack's ``locales/<lang>/nodeDefs.json`` merged under ``nodeDefs``
  at ``GET /i18n`` (app/custom_node_manager.py), and the frontend reads its names and tooltips from
  there (``nodeDefs.<Node>.inputs.<input>.tooltip``).
* ``web/js/docs/<Node>.md``: the help page of the node library. The frontend fetches a custom node's
  help from ``/extensions/<pack folder>/docs/<Node>/<locale>.md``, then ``.../docs/<Node>.md``;
  ``/extensions/<pack folder>/`` is the pack's ``WEB_DIRECTORY`` (``./web/js``).

The classes are taken as ComfyUI loaded them (the real ComfyUI in process, this pack through ComfyUI's
own loader), so the files say what ``/object_info`` says. Run through the venv:

    scripts/test.sh  exports P3S_COMFYUI; then:  $P3S_VENV/bin/python scripts/make_node_docs.py

tests/integration/test_node_library.py checks that the committed files equal what this writes.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

REPO = harness.REPO
LOCALE = REPO / "locales" / "en" / "nodeDefs.json"
DOCS = REPO / "web" / "js" / "docs"
GROUPS = ("required", "optional")


def _inputs(cls):
    spec = cls.INPUT_TYPES()
    for group in GROUPS:
        for name, s in spec.get(group, {}).items():
            opts = s[1] if len(s) > 1 and isinstance(s[1], dict) else {}
            yield group, name, s[0], opts


def _type_name(t) -> str:
    return "COMBO" if isinstance(t, (list, tuple)) else str(t)


def _outputs(cls):
    names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
    tips = getattr(cls, "OUTPUT_TOOLTIPS", ()) or ("",) * len(cls.RETURN_TYPES)
    return list(zip(names, cls.RETURN_TYPES, tips))


def node_defs(classes: dict, display: dict) -> dict:
    """The nodeDefs locale object for ``classes`` (name -> class) with ``display`` names."""
    out = {}
    for name in sorted(classes):
        cls = classes[name]
        out[name] = {
            "display_name": display.get(name, name),
            "description": getattr(cls, "DESCRIPTION", ""),
            "inputs": {inp: {"name": inp, "tooltip": opts.get("tooltip", "")} for _, inp, _, opts in _inputs(cls)},
            "outputs": {str(i): {"name": n, "tooltip": tip} for i, (n, _, tip) in enumerate(_outputs(cls))},
        }
    return out


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


#: a COMBO of these is a list of the user's files, different on every machine
MODEL_FILES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def _default(t, opts) -> str:
    if "default" in opts:
        return f"`{opts['default']!r}`" if isinstance(opts["default"], str) else f"`{opts['default']}`"
    if isinstance(t, (list, tuple)) and t and not any(str(x).endswith(MODEL_FILES) for x in t):
        return f"`{t[0]}`"  # a fixed list of choices; a list of files (what the models folder holds) has none
    return ""


def node_doc(name: str, cls, display: str) -> str:
    """The node library's help page (Markdown) of one node."""
    lines = [f"# {display}", "", getattr(cls, "DESCRIPTION", ""), ""]
    rows = list(_inputs(cls))
    main = [r for r in rows if not r[3].get("advanced")]
    adv = [r for r in rows if r[3].get("advanced")]

    def table(items):
        out = ["| input | type | default | what it does |", "|---|---|---|---|"]
        for group, inp, t, opts in items:
            label = f"`{inp}`" + (" (optional)" if group == "optional" else "")
            out.append(f"| {label} | {_type_name(t)} | {_default(t, opts)} | {_cell(opts.get('tooltip', ''))} |")
        return out

    lines += ["## Inputs", ""] + table(main) + [""]
    if adv:
        lines += ["## Advanced inputs", "",
                  "Folded on the node until you choose **Show Advanced** (right-click the node); their "
                  "defaults follow the paper or are the safe choice.", ""] + table(adv) + [""]
    lines += ["## Outputs", "", "| output | type | what it is |", "|---|---|---|"]
    lines += [f"| `{n}` | {t} | {_cell(tip)} |" for n, t, tip in _outputs(cls)] + [""]
    aliases = getattr(cls, "SEARCH_ALIASES", [])
    if aliases:
        lines += ["## Find it", "", "Search the node library for: " + ", ".join(f"*{a}*" for a in aliases) + ".", ""]
    lines += ["---", "P3S for ComfyUI: the README of the pack has the workflows, the paper and the measurements; "
              "docs/ERRORS.md in the repository lists every error message and its fix.", ""]
    return "\n".join(lines)


def render(classes: dict, display: dict) -> dict[Path, str]:
    """Every generated file (path -> text)."""
    files = {LOCALE: json.dumps(node_defs(classes, display), indent=2, ensure_ascii=False) + "\n"}
    for name in sorted(classes):
        files[DOCS / f"{name}.md"] = node_doc(name, classes[name], display.get(name, name))
    return files


def pack_classes(nodes_module, pack_module) -> tuple[dict, dict]:
    """This pack's node classes as ComfyUI loaded them, and their display names."""
    classes = {k: v for k, v in pack_module.NODE_CLASS_MAPPINGS.items()}
    display = {k: nodes_module.NODE_DISPLAY_NAME_MAPPINGS.get(k, k) for k in classes}
    return classes, display


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        nodes, pack = harness.boot_in_process(harness.make_base_dir(Path(tmp)))
        files = render(*pack_classes(nodes, pack))
    stale = [p for p in DOCS.glob("*.md") if p not in files]
    for p in stale:
        p.unlink()
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(path.relative_to(REPO))
    return 0


if __name__ == "__main__":
    sys.exit(main())
