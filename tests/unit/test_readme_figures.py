"""Every measured figure in README.md and docs/*.md is generated from a committed result file, not typed
(issue 24 item 2; the benchmark block: issue 13 part 6; the GPU block: issue 21 item 7).

Fast: reads the committed result files and the Markdown only (no ComfyUI); the toy world's page is
compared with its generator's output (imports torch, no model).
"""
from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import readme_figures as rf  # noqa: E402
import results_file  # noqa: E402

RESULT = json.loads(rf.RESULTS.read_text())
GPU = rf.gpu_results()
BY_NAME = {b.name: b for b in rf.BLOCKS}


def _copy_repo(tmp_path: Path) -> Path:
    """The files the blocks live in and are rendered from, in a fresh root."""
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    shutil.copy(REPO / "README.md", root / "README.md")
    for doc in (REPO / "docs").glob("*.md"):
        shutil.copy(doc, root / "docs" / doc.name)
    shutil.copytree(REPO / rf.RESULTS_DIR, root / rf.RESULTS_DIR, ignore=shutil.ignore_patterns("*.md"))
    return root


# --- (a) every block agrees with its result files ---------------------------------------------------------
def test_every_block_is_in_its_file_once_and_generated_from_the_committed_results():
    assert len(BY_NAME) == len(rf.BLOCKS), "two blocks share a name"
    for b in rf.BLOCKS:
        text = (REPO / b.target).read_text()
        assert text.count(b.start) == 1 and text.count(b.end) == 1, b.name
        assert rf.find(text, b) == b.text(), f"{b.name} is stale: run scripts/readme_figures.py"
        for src in b.sources:
            assert list(REPO.glob(src)), f"{b.name}: no committed {src}"
    assert rf.stale() == []
    assert rf.main(["--check"]) == 0


def test_check_names_the_stale_block_and_a_rewrite_restores_it_alone(tmp_path, capsys):
    root = _copy_repo(tmp_path)
    readme = root / "README.md"
    b = BY_NAME["reference-cost"]
    good = readme.read_text()
    old = rf.find(good, b)
    readme.write_text(good.replace(old, old.replace("×", "x", 1)))
    assert rf.main(["--check", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert "reference-cost (README.md)" in err and "bench (" not in err
    assert rf.main(["--check", "--root", str(root), "--only", "bench", "--only", "gpu"]) == 0
    assert rf.main(["--root", str(root), "--only", "reference-cost"]) == 0
    assert readme.read_text() == good
    readme.write_text(good.replace(b.end, ""))  # a lost marker is reported, not silently skipped
    assert rf.main(["--check", "--root", str(root)]) == 1
    assert "0 end markers" in capsys.readouterr().err


def _edit_json(root: Path, name: str, edit) -> None:
    path = root / rf.RESULTS_DIR / name
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("name, file, edit, want", [
    ("reference-cost", "reference_cost.json",
     lambda d: d["ratio_to_plain"].__setitem__("one reference", 1.234), "reference 1.23×"),
    ("reproducible", "reproducible.json", lambda d: d.__setitem__("median_step_s_1_thread", 42.5), "42.50 s on one thread"),
    ("copy-params", "adapter_size.json", lambda d: d["params"].__setitem__("copy", 123_456_789), "123.5 M parameters"),
    ("stored-reference", "adapter_size.json", lambda d: d.__setitem__("per_photo_bytes", 2_345_678), "2.3 MB per photo"),
    ("copy-precision", "copy_precision.json",
     lambda d: next(iter(d["steps"].values()))["fp16"].update(move_over_effect_mean=0.25, move_over_effect_max=0.5),
     "25.0–50.0 %"),
    ("train-memory", "bench.json", lambda d: d["train"][0].__setitem__("peak_rss_mib", 10 * 1024),
     "| 10.0 GiB |"),
    ("copy-layouts", "copy_layouts.json", lambda d: d["per_step"]["full"].__setitem__("ratio_to_plain", 2.345),
     "2.35× ("),
    ("heldout", "heldout_loss.json",
     lambda d: d["comfyui"]["summary"]["other photo"].update(trained=0.123456, trained_vs_plain=-0.987), "| -98.7% |"),
    ("heldout", "heldout_loss.json", lambda d: d["toyworld"]["dilution_untrained"].__setitem__("mean", 0.777),
     "mean 78%"),
    ("heldout", "heldout_loss.json",
     lambda d: d["toyworld_ablation"]["rows"][1].__setitem__("mean_trained_vs_plain", -0.555), "| -55.5% |"),
])
def test_a_block_follows_its_result_file(tmp_path, name, file, edit, want):
    """A changed figure in the result file changes the block: the text cannot keep a stale number."""
    root = _copy_repo(tmp_path)
    b = BY_NAME[name]
    before = b.render(root)
    assert want not in before
    _edit_json(root, file, edit)
    after = b.render(root)
    assert want in after and after != before
    assert rf.main(["--check", "--root", str(root), "--only", name]) == 1


def test_catalogue_counts_follow_the_catalogue_rows(tmp_path):
    root = _copy_repo(tmp_path)
    before = rf.catalogue_counts(root)
    assert before["rows"] == before["P3S"] + before["400"] + before["no"]
    doc = root / rf.ERRORS_DOC
    row = "| x | y | z | w | `test_made_up` | 400 |\n"
    doc.write_text(doc.read_text().replace("\n## ", "\n" + row + "\n## ", 1))
    after = rf.catalogue_counts(root)
    assert (after["rows"], after["400"], after["P3S"]) == (before["rows"] + 1, before["400"] + 1, before["P3S"])
    assert f"lists {after['rows']} refused" in rf.render_errors_readme(root)
    assert f"The catalogue has **{after['rows']} rows**" in rf.render_errors_doc(root)
    assert rf.main(["--check", "--root", str(root)]) == 1
    assert rf.main(["--root", str(root)]) == 0 and rf.main(["--check", "--root", str(root)]) == 0


def test_the_toyworld_page_is_its_generators_output():
    """docs/TOYWORLD.md is generated whole by benchmarks/toyworld/evaluate.py (not scanned for figures)."""
    (src, generator), = [rf.GENERATED_FILES["docs/TOYWORLD.md"]]
    assert generator == "benchmarks/toyworld/evaluate.py"
    sys.path.insert(0, str(REPO))
    from benchmarks.toyworld import evaluate

    assert evaluate.markdown(json.loads((REPO / src).read_text())) == (REPO / "docs" / "TOYWORLD.md").read_text()


# --- (b) no measured figure typed outside the generated blocks ---------------------------------------------
def test_no_measured_figure_is_typed_outside_the_generated_blocks():
    hits = rf.typed_figures()
    assert hits == [], "typed figures (put them in a generated block, or rephrase):\n" + "\n".join(hits)


TYPED = ["the loss falls by 12.3 % (1.392 → 1.220)", "agrees to 3.6e-6", "peak RSS 11.7 → 8.2 GiB",
         "one reference 1.32×, average 1.86× (+3.3 s vs +9.0 s)", "a step took 3.77 s", "718 MB in VRAM",
         "179.6 M parameters", "lists 126 refused\n  inputs", "**P3S** (71 rows)", "bf16 moves it 3.1–3.2 %"]


def test_the_scan_flags_typed_figures_but_not_inside_a_registered_block(tmp_path):
    """Today's (before issue 24) kinds of typed figures are caught; a registered block hides them, a
    made-up marker pair does not."""
    root = _copy_repo(tmp_path)
    readme = root / "README.md"
    clean = readme.read_text()
    for typed in TYPED:
        readme.write_text(clean + "\n" + typed + "\n")
        assert len(rf.typed_figures(root)) >= 1, typed
    b = BY_NAME["reproducible"]
    inside = clean.replace(b.end, "\n".join(TYPED) + "\n" + b.end)
    readme.write_text(inside)
    assert rf.typed_figures(root) == []
    readme.write_text(clean + "<!-- mine:start -->\n" + "\n".join(TYPED) + "\n<!-- mine:end -->\n")
    assert len(rf.typed_figures(root)) >= len(TYPED)
    (root / "docs" / "NEW.md").write_text("It took 5.5 s.\n")  # every docs/*.md is scanned
    readme.write_text(clean)
    assert [h.split(":")[0] for h in rf.typed_figures(root)] == ["docs/NEW.md"]


def test_every_allowed_non_measurement_still_occurs():
    """The allow-list stays small and current: an entry no document uses any more is removed."""
    text = "\n".join(p.read_text() for p in [REPO / "README.md", *(REPO / "docs").glob("*.md")])
    assert [a for a in rf.NOT_MEASURED if a not in text] == []
    assert len(rf.NOT_MEASURED) <= 16


# --- the result files and their stamps ---------------------------------------------------------------------
def test_results_file_stamps_date_command_and_machine(tmp_path):
    out = results_file.write(tmp_path / "x.json", {"kind": "x", "value": 1.5, "date": "overwritten"},
                             [str(REPO / "scripts" / "measure_adapter_size.py"), "--out", "a b.json"])
    data = json.loads(out.read_text())
    assert data["value"] == 1.5 and data["kind"] == "x"
    assert data["command"] == "scripts/measure_adapter_size.py --out 'a b.json'"
    assert data["date"].endswith(" UTC") and data["date"] != "overwritten"
    assert data["machine"]["cores"] >= 1 and data["machine"]["cpu"]
    assert results_file.path_for("reference_cost") == REPO / rf.RESULTS_DIR / "reference_cost.json"
    assert results_file.path_for(tmp_path / "y.json") == tmp_path / "y.json"


def test_each_committed_result_file_names_its_producer():
    """Each result file behind a block was written by a producer a block header tells the reader to
    rerun, and says when and where."""
    producers = {b.rerun.split()[0] for b in rf.BLOCKS if b.rerun}
    for b in rf.BLOCKS:
        for src in b.sources:
            for path in REPO.glob(src):
                if path.suffix != ".json":
                    continue
                data = json.loads(path.read_text())
                # A file measured in parts (heldout_loss.json) stamps each part's run.
                stamps = [p["run"] for p in data.values() if isinstance(p, dict) and "run" in p] or [data]
                for st in stamps:
                    assert st["command"].split()[0] in producers, (b.name, path.name, st["command"])
                    assert st["date"] and st.get("machine"), (b.name, path.name)


# --- the benchmark block ----------------------------------------------------------------------------------
def test_the_bench_block_is_unchanged_by_the_table():
    """The benchmark block's text is the one the old single-block script wrote."""
    assert BY_NAME["bench"].text() == rf.block(RESULT)
    assert rf.block(RESULT).startswith("<!-- bench:start -->\n<!-- generated by scripts/readme_figures.py from "
                                       "benchmarks/results/bench.json; edit neither by hand: rerun scripts/bench.sh, "
                                       "then scripts/readme_figures.py -->\n```bash\n")


def test_committed_results_hold_the_512_sdpa_run_with_a_profile():
    """The 512^2 SDPA run, the issue's headline, is measured (its profile measured or kept from an
    earlier run, marked); a size not measured is marked in the file and so in the README. Sub-quad is
    not benchmarked (issue 24 item 3: not like for like; README 'Attention')."""
    runs = [r for r in RESULT["runs"] if "error" not in r]
    got = {(r["attention"], r["size"]) for r in runs}
    assert ("sdpa", 512) in got, got
    assert all(r.get("attention") == "sdpa" for r in RESULT["runs"])
    marked = {(r["attention"], r.get("size")) for r in RESULT["runs"] if "error" in r}
    block = rf.render(RESULT)
    for attention, size in marked:
        assert f"Not measured: {f'{size}², ' if size else ''}{rf.BACKENDS[attention]}" in block
    for r in runs:
        assert r["kernel"] == "attention_pytorch"
        p = r["profile"]
        assert set(p["extra_attention_s"]) == {"0", "1", "2", "3"} and p["copy_s"] > 0
        if "profile_from" in r:
            assert f"kept from the run of {r['profile_from']['date']}" in block
        assert abs(r["steps_per_variant"]["plain"]["ratio_to_plain"] - 1.0) < 1e-9
    assert RESULT["machine"]["cpu"] and RESULT["date"] and RESULT["command"].startswith("scripts/bench.sh")


def test_the_block_follows_the_numbers():
    changed = copy.deepcopy(RESULT)
    run = next(r for r in changed["runs"] if r.get("size") == 512)
    s = run["steps_per_variant"]["p3s"]
    s["ratio_to_plain"] += 0.123
    before, after = rf.render(RESULT), rf.render(changed)
    assert before != after
    assert f"{s['ratio_to_plain']:.2f}×" in after
    changed["machine"]["cpu"] = "Some Other CPU @ 1.00GHz"
    assert "Some Other CPU @ 1.00GHz" in rf.render(changed)


# --- the GPU block ------------------------------------------------------------------------------------------
def test_committed_gpu_results_hold_the_four_variants_in_both_vram_modes_training_and_a_low_vram_run():
    """What issue 21 item 7 asks of a GPU run is in each committed gpu-*.json, or the file says why not."""
    assert GPU, "no benchmarks/results/gpu-*.json"
    for name, r in GPU:
        assert r["kind"] == "gpu_check" and r["date"] and r["command"].startswith("scripts/gpu_check.py"), name
        st = r["settings"]
        assert (st["size"], st["steps"], st["cfg"], st["sampler"], st["unet_dtype"]) == (512, 50, 7.5, "ddim", "fp16")
        for mode in ("dynamic", "legacy"):
            s = r["sampling"][mode]
            assert s.get("error") or len(s["rounds"]) >= 2, (name, mode)
            if not s.get("error"):
                assert set(s["variants"]) == set(rf.GPU_VARIANTS), (name, mode)
                assert abs(s["variants"]["plain"]["ratio_to_plain"] - 1.0) < 1e-9
                for v in s["variants"].values():
                    lo, hi = v["ratio_spread"]
                    assert lo <= v["ratio_to_plain"] <= hi and len(v["ratio_rounds"]) == len(s["rounds"])
        t = r["train"]
        assert (t["epochs"], t["images"], t["size"]) == (60, 5, 512) or t.get("error"), name
        assert r["lowvram"] and all("completed" in x and x["reserve_vram_gib"] > 0 for x in r["lowvram"]), name


def test_the_gpu_block_follows_the_numbers():
    name, result = GPU[0]
    changed = copy.deepcopy(result)
    s = changed["sampling"]["dynamic"]["variants"]["p3s"]
    s["ratio_to_plain"] += 0.1234
    s["ratio_spread"][1] += 0.1234
    before, after = rf.render_gpu(name, result), rf.render_gpu(name, changed)
    assert before != after and f"{s['ratio_to_plain']:.3f}×" in after
    changed["train"]["exec_s"] = 12.3456
    assert "12.3 s for the whole prompt" in rf.render_gpu(name, changed)
    if changed["lowvram"]:
        changed["lowvram"][0]["completed"] = False
        assert "| **no** |" in rf.render_gpu(name, changed)


def test_the_heldout_block_holds_both_models_and_16_layers_of_dilution():
    """The held-out loss result (issue 22 item 4) covers the random SD1.5 through the nodes and the toy
    world, each with the untrained adapter's dilution at all 16 self-attention layers."""
    result = rf.load(rf.REPO, f"{rf.RESULTS_DIR}/heldout_loss.json")
    assert set(result) >= {"comfyui", "toyworld"}
    for part in ("comfyui", "toyworld"):
        assert len(result[part]["dilution_untrained"]["per_layer"]) == 16


def test_the_committed_ablation_supports_the_enhancement_defaults():
    """The README's decision (issue 22: the cross-attention enhancement by default, trained with another
    photo by ``reference_pairing="auto"``) stands on the committed ablation: with another photo the cross
    enhancement beats the plain denoiser and the old default (self-attention only, own photo) on average,
    and with its own photo it is worse than plain."""
    a = rf.load(rf.REPO, f"{rf.RESULTS_DIR}/heldout_loss.json")["toyworld_ablation"]
    mean = {(r["enhancement"], r["reference_pairing"]): r["mean_trained_vs_plain"] for r in a["rows"]}
    assert mean[("cross", "other photo")] > max(0.0, mean[("self", "self")]), mean
    assert mean[("cross", "self")] < 0.0, mean
