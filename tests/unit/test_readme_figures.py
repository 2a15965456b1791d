"""The README's benchmark figures are the committed results, generated, not typed (issue 13 part 6).

Fast: reads benchmarks/results/bench.json and README.md only (no ComfyUI, no torch).
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
    readme.write_text("intro\n" + readme_figures.block(RESULT) + "\noutro\n")
    assert readme_figures.main(["--check", "--readme", str(readme)]) == 0
    readme.write_text(readme.read_text().replace("×", "x", 1))
    assert readme_figures.main(["--check", "--readme", str(readme)]) == 1
    assert readme_figures.main(["--readme", str(readme)]) == 0  # rewrite
    assert readme_figures.main(["--check", "--readme", str(readme)]) == 0
    assert readme.read_text().startswith("intro\n") and readme.read_text().endswith("\noutro\n")
