"""What ComfyUI shows of the pack (issue 25), on the archive the Comfy Registry would get.

The server tests install the pack as the registry's archive (the files scripts/registry_package.py
selects, copied into a fresh folder: no tests, scripts or command line) and start the real ComfyUI on
it, so they also prove that the archive alone loads. Checked there: every node in ``/object_info``
with its description, its advanced inputs and (where the server reports them, as for core nodes)
its search aliases; the locale at ``/i18n``; the help pages where the frontend fetches them; the
example workflows and their thumbnails in the template browser. The browser test checks the folding
of the advanced inputs in the real frontend, and the help page fetched from the page.
"""
from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import pytest

import harness
import make_node_docs
import registry_package

REPO = Path(__file__).resolve().parents[2]
PACK = harness.PACK_LINK_NAME
NODES = ["P3SPointSelector", "P3SRNGRMaskInpaint", "P3STimestepWeightScheduler", "P3SConditionInjector",
         "P3SAdapterLoader", "P3SAdapterSave", "P3STrainer", "P3SRegion"]
# The inputs beyond the paper's few: folded by the frontend until "Show Advanced".
ADVANCED = {
    "P3STrainer": {"save_every", "gradient_checkpointing", "ac_reading", "reference_pairing", "reproducible",
                   "copy_layout", "enhancement"},
    "P3SConditionInjector": {"apply_to", "reference_index", "reference_mode", "feather", "level0_keys", "copy_precision",
                             "cross_attention"},
    "P3SRNGRMaskInpaint": {"grow"},
    "P3STimestepWeightScheduler": {"strength", "custom_values"},
}
# The paper's settings stay on the node.
NOT_ADVANCED = {
    "P3STrainer": {"prompt", "identifier", "epochs", "learning_rate", "gamma", "resolution", "seed", "save_name"},
    "P3SConditionInjector": {"lam", "strength"},
    "P3SRNGRMaskInpaint": {"sigma", "fill", "remove"},
    "P3STimestepWeightScheduler": {"mode", "alpha", "beta", "k"},
}
SEARCH_WORDS = {"subject", "personalize", "dreambooth", "points", "mask", "sam"}
WORKFLOWS = sorted(p.stem for p in (REPO / "workflows").glob("*.json"))


def _get_raw(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read()


@pytest.fixture(scope="module")
def archive_server(tmp_path_factory):
    """The real ComfyUI server with the pack installed from the registry archive's files only."""
    root = tmp_path_factory.mktemp("registry_archive")
    pack = root / "pack"
    files = registry_package.archive_files(REPO)
    for f in files:
        (pack / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, pack / f)
    assert not (pack / "tests").exists() and not (pack / "scripts").exists()
    base = harness.make_base_dir(root / "base", pack_dir=pack)
    srv = harness.ComfyServer(base=base).start()
    try:
        yield srv
    finally:
        srv.stop()



# ------------------------------------------------------------------ the generated files (in process)

def test_generated_files_equal_what_the_script_writes(comfy):
    """locales/en/nodeDefs.json and web/js/docs/*.md are what scripts/make_node_docs.py writes from the
    node classes ComfyUI loaded: one source."""
    files = make_node_docs.render(*make_node_docs.pack_classes(comfy.nodes, comfy.pack))
    assert sorted(p.name for p in files if p.suffix == ".md") == sorted(f"{n}.md" for n in NODES)
    for path, text in files.items():
        assert path.read_text(encoding="utf-8") == text, f"{path.relative_to(REPO)} is stale: run scripts/make_node_docs.py"
    assert sorted(p.name for p in make_node_docs.DOCS.glob("*.md")) == sorted(f"{n}.md" for n in NODES)


def test_node_classes_carry_aliases_and_advanced_flags(comfy):
    words = set()
    for name in NODES:
        cls = comfy.node(name)
        aliases = getattr(cls, "SEARCH_ALIASES", None)
        assert isinstance(aliases, list) and aliases and all(isinstance(a, str) and a for a in aliases), name
        words |= set(aliases)
    assert SEARCH_WORDS <= words, SEARCH_WORDS - words


# ------------------------------------------------------------------ the server, on the archive

@pytest.mark.slow
@pytest.mark.server
def test_object_info_shows_descriptions_advanced_inputs_and_aliases(archive_server):
    info = archive_server.get("/object_info")
    core_reports_aliases = "search_aliases" in info["CLIPTextEncode"] and bool(info["CLIPTextEncode"]["search_aliases"])
    for name in NODES:
        entry = info[name]
        assert entry["python_module"] == f"custom_nodes.{PACK}", entry["python_module"]
        assert len(entry["description"]) > 40
        spec = {**entry["input"].get("required", {}), **entry["input"].get("optional", {})}
        advanced = {k for k, v in spec.items() if len(v) > 1 and isinstance(v[1], dict) and v[1].get("advanced")}
        assert advanced == ADVANCED.get(name, set()), name
        assert NOT_ADVANCED.get(name, set()) <= set(spec) - advanced, name
        if core_reports_aliases:  # ComfyUI 0.33 reports SEARCH_ALIASES of V1 nodes; 0.3.75 reports none
            aliases = entry["search_aliases"]
            doc = (REPO / "web" / "js" / "docs" / f"{name}.md").read_text(encoding="utf-8")
            assert aliases and all(f"*{a}*" in doc for a in aliases), name  # the classes' aliases
        else:
            assert not entry.get("search_aliases"), name
    if core_reports_aliases:
        words = set().union(*(info[n]["search_aliases"] for n in NODES))
        assert SEARCH_WORDS <= words


@pytest.mark.slow
@pytest.mark.server
def test_i18n_serves_the_node_definitions_locale(archive_server):
    served = archive_server.get("/i18n")["en"]["nodeDefs"]
    ours = json.loads((REPO / "locales" / "en" / "nodeDefs.json").read_text(encoding="utf-8"))
    info = archive_server.get("/object_info")
    for name in NODES:
        assert served[name] == ours[name]
        # the locale says what the server says
        assert ours[name]["display_name"] == info[name]["display_name"]
        assert ours[name]["description"] == info[name]["description"]
        spec = {**info[name]["input"].get("required", {}), **info[name]["input"].get("optional", {})}
        assert {k: v[1].get("tooltip", "") for k, v in spec.items()} == {k: v["tooltip"] for k, v in ours[name]["inputs"].items()}
        assert [o["tooltip"] for o in ours[name]["outputs"].values()] == list(info[name]["output_tooltips"])


@pytest.mark.slow
@pytest.mark.server
def test_help_pages_are_served_where_the_frontend_looks(archive_server):
    """The frontend fetches /extensions/<pack>/docs/<Node>/<locale>.md, then /extensions/<pack>/docs/<Node>.md."""
    for name in NODES:
        status, ctype, body = _get_raw(f"{archive_server.url}/extensions/{PACK}/docs/{name}.md")
        assert status == 200
        text = body.decode("utf-8")
        assert text == (REPO / "web" / "js" / "docs" / f"{name}.md").read_text(encoding="utf-8")
        assert text.startswith("# P3S ")
    # the help pages are no scripts: the frontend imports only the .js files of WEB_DIRECTORY
    assert all(e.endswith(".js") for e in archive_server.get("/extensions") if f"/{PACK}/" in e)


@pytest.mark.slow
@pytest.mark.server
def test_example_workflows_and_thumbnails_in_the_template_browser(archive_server):
    templates = archive_server.get("/workflow_templates")
    assert sorted(templates[PACK]) == WORKFLOWS
    for name in WORKFLOWS:
        status, ctype, body = _get_raw(f"{archive_server.url}/api/workflow_templates/{PACK}/{name}.jpg")
        assert status == 200 and ctype == "image/jpeg" and body[:3] == b"\xff\xd8\xff"
        assert body == (REPO / "workflows" / f"{name}.jpg").read_bytes()
        status, _, wf = _get_raw(f"{archive_server.url}/api/workflow_templates/{PACK}/{name}.json")
        assert status == 200 and json.loads(wf)["nodes"]


# ------------------------------------------------------------------ the real frontend

ADVANCED_JS = """(type) => {
  const n = LiteGraph.createNode(type); window.app.graph.add(n);
  const out = n.widgets.map(w => [w.name, !!w.advanced, n.isWidgetVisible(w)]);
  n.showAdvanced = true;
  const shown = n.widgets.filter(w => w.advanced).map(w => n.isWidgetVisible(w));
  window.app.graph.remove(n);
  return {widgets: out, shown};
}"""


@pytest.mark.parametrize("node_type", sorted(ADVANCED))
def test_frontend_folds_the_advanced_inputs(page, node_type):
    got = page.evaluate(ADVANCED_JS, node_type)
    widgets = {name: (adv, visible) for name, adv, visible in got["widgets"]}
    for name in ADVANCED[node_type]:
        assert widgets[name] == (True, False), (name, widgets[name])
    for name in NOT_ADVANCED[node_type]:
        assert widgets[name] == (False, True), (name, widgets[name])
    assert got["shown"] and all(got["shown"])  # "Show Advanced" brings them back
    assert page.errors == []


def test_frontend_fetches_the_help_page(page):
    text = page.evaluate(f"async () => (await fetch('/extensions/{PACK}/docs/P3STrainer.md')).text()")
    assert text.startswith("# P3S Trainer") and "## Advanced inputs" in text
