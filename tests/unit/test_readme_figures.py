"""The README's benchmark figures are the committed results, generated, not typed (issue 13 part 6;
the GPU block: issue 21 item 7).

Fast: reads benchmarks/results/bench.json, benchmarks/results/gpu-*.json and README.md only (no
ComfyUI, no torch).
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import readme_figures  # noqa: E402

RESULT = json.loads(readme_figures.RESULTS.read_text())
GPU = readme_figures.gpu_results()


def test_readme_block_is_generated_from_the_committed_results():
    text = readme_figures.README.read_text()
    assert text.count(readme_figures.START) == 1 and text.count(readme_figures.END) == 1
    assert readme_figures.readme_block(text) == readme_figures.block(RESULT)
    assert readme_figures.main(["--check"]) == 0


def test_committed_results_account_for_both_backends_at_256_and_512_with_a_profile():
    """Each (backend, size) was measured with its profile, or the file (and so the README) says it
    was not; the 512^2 SDPA run, the issue's headline, is there."""
    runs = [r for r in RESULT["runs"] if "error" not in r]
    got = {(r["attention"], r["size"]) for r in runs}
    assert ("sdpa", 512) in got, got
    marked = {(r["attention"], r.get("size")) for r in RESULT["runs"] if "error" in r}
    for want in [("sdpa", 256), ("sdpa", 512), ("subquad", 256), ("subquad", 512)]:
        assert want in got or want in marked or (want[0], None) in marked, want
    block = readme_figures.render(RESULT)
    for attention, size in marked:
        assert f"Not measured: {f'{size}², ' if size else ''}{readme_figures.BACKENDS[attention]}" in block
    for r in runs:
        assert r["kernel"] == {"sdpa": "attention_pytorch", "subquad": "attention_sub_quad"}[r["attention"]]
        p = r["profile"]
        assert set(p["extra_attention_s"]) == {"0", "1", "2", "3"} and p["copy_s"] > 0
        assert abs(r["steps_per_variant"]["plain"]["ratio_to_plain"] - 1.0) < 1e-9
    assert RESULT["machine"]["cpu"] and RESULT["date"] and RESULT["command"].startswith("scripts/bench.sh")


def test_the_block_follows_the_numbers():
    """A changed figure changes the block: the README cannot keep a stale or typed number."""
    changed = copy.deepcopy(RESULT)
    run = next(r for r in changed["runs"] if r.get("size") == 512)
    s = run["steps_per_variant"]["p3s"]
    s["ratio_to_plain"] += 0.123
    before, after = readme_figures.render(RESULT), readme_figures.render(changed)
    assert before != after
    assert f"{s['ratio_to_plain']:.2f}×" in after
    changed["machine"]["cpu"] = "Some Other CPU @ 1.00GHz"
    assert "Some Other CPU @ 1.00GHz" in readme_figures.render(changed)


def test_check_mode_fails_on_an_edited_readme(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n" + readme_figures.block(RESULT) + "\n" + readme_figures.gpu_block(GPU) + "\noutro\n")
    assert readme_figures.main(["--check", "--readme", str(readme)]) == 0
    readme.write_text(readme.read_text().replace("×", "x", 1))
    assert readme_figures.main(["--check", "--readme", str(readme)]) == 1
    assert readme_figures.main(["--readme", str(readme)]) == 0  # rewrite
    assert readme_figures.main(["--check", "--readme", str(readme)]) == 0
    assert readme.read_text().startswith("intro\n") and readme.read_text().endswith("\noutro\n")


# --- the GPU block -------------------------------------------------------------------------------------
def test_readme_gpu_block_is_generated_from_the_committed_gpu_results():
    text = readme_figures.README.read_text()
    assert text.count(readme_figures.GPU_START) == 1 and text.count(readme_figures.GPU_END) == 1
    assert readme_figures.readme_block(text, readme_figures.GPU_START, readme_figures.GPU_END) == \
        readme_figures.gpu_block(GPU)


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
                assert set(s["variants"]) == set(readme_figures.GPU_VARIANTS), (name, mode)
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
    before, after = readme_figures.render_gpu(name, result), readme_figures.render_gpu(name, changed)
    assert before != after and f"{s['ratio_to_plain']:.3f}×" in after
    changed["train"]["exec_s"] = 12.3456
    assert "12.3 s for the whole prompt" in readme_figures.render_gpu(name, changed)
    if changed["lowvram"]:
        changed["lowvram"][0]["completed"] = False
        assert "| **no** |" in readme_figures.render_gpu(name, changed)


def test_check_mode_fails_on_an_edited_gpu_block(tmp_path):
    readme = tmp_path / "README.md"
    gpu = readme_figures.gpu_block(GPU)
    readme.write_text("intro\n" + readme_figures.block(RESULT) + "\n" + gpu + "\noutro\n")
    assert readme_figures.main(["--check", "--readme", str(readme)]) == 0
    readme.write_text(readme.read_text().replace(gpu, gpu.replace("×", "x", 1) if "×" in gpu else gpu + " "))
    assert readme_figures.main(["--check", "--readme", str(readme)]) == 1
    assert readme_figures.main(["--readme", str(readme)]) == 0
    assert readme_figures.main(["--check", "--readme", str(readme)]) == 0


# --- the held-out loss block (issue 22 item 4) -------------------------------------------------------
HELDOUT = json.loads((readme_figures.RESULTS.parent / readme_figures.HELDOUT_RESULTS).read_text())


def test_readme_heldout_block_is_generated_from_the_committed_heldout_results():
    text = readme_figures.README.read_text()
    assert text.count(readme_figures.HELDOUT_START) == 1 and text.count(readme_figures.HELDOUT_END) == 1
    assert readme_figures.readme_block(text, readme_figures.HELDOUT_START, readme_figures.HELDOUT_END) == \
        readme_figures.heldout_block(HELDOUT)
    assert set(HELDOUT) == {"comfyui", "toyworld"}
    for part in HELDOUT.values():
        assert len(part["dilution_untrained"]["per_layer"]) == 16


def test_the_heldout_block_follows_the_numbers(tmp_path):
    edited = copy.deepcopy(HELDOUT)
    m = edited["comfyui"]["summary"]["other photo"]
    m["trained"], m["trained_vs_plain"] = 0.123456, -0.987
    edited["toyworld"]["dilution_untrained"]["mean"] = 0.777
    text = readme_figures.heldout_block(edited)
    assert "| 0.1235 |" in text and "| -98.7% |" in text and "mean 78%" in text
    assert text != readme_figures.heldout_block(HELDOUT)
    # --check sees an edited number in the README's heldout block
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "bench.json").write_text(json.dumps(RESULT))
    (folder / readme_figures.HELDOUT_RESULTS).write_text(json.dumps(HELDOUT))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n" + readme_figures.block(RESULT) + "\n" + readme_figures.gpu_block(GPU) + "\n"
                      + readme_figures.heldout_block(edited) + "\noutro\n")
    args = ["--results", str(folder / "bench.json"), "--gpu-results", str(readme_figures.RESULTS.parent),
            "--readme", str(readme)]
    assert readme_figures.main(["--check", *args]) == 1
    assert readme_figures.main(args) == 0
    assert readme_figures.main(["--check", *args]) == 0
    assert readme_figures.heldout_block(HELDOUT) in readme.read_text()
