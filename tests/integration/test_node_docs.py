"""Every node of the pack explains itself: a description, a tooltip on every input and output."""
from __future__ import annotations

from test_harness import pack_node_names


def test_every_node_and_input_has_help(comfy):
    names = pack_node_names()
    assert len(names) == 8  # 7 + P3S Region (issue 16)
    for name in names:
        cls = comfy.node(name)
        assert len(getattr(cls, "DESCRIPTION", "")) > 40, name
        assert comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS[name].startswith("P3S "), name
        spec = cls.INPUT_TYPES()
        for group in ("required", "optional"):
            for inp, s in spec.get(group, {}).items():
                opts = s[1] if len(s) > 1 else {}
                assert len(opts.get("tooltip", "")) > 10, (name, inp)
        assert len(getattr(cls, "OUTPUT_TOOLTIPS", ())) == len(cls.RETURN_TYPES), name
