"""One benchmark run: per-step sampling ratios at 256^2 and 512^2, the profile of a P3S step, RNGR
mask time, pack import time and training time per epoch.

Every figure that is compared is measured in one run, interleaved, at the same size and seed, and
reported as a ratio to plain SD1.5 in the same process (these machines are shared and noisy). Per
round, every variant samples ``--steps`` N steps and 1 step (the order reversed every other round,
:func:`timing.round_order`); its per-step time is the difference over N - 1 (fixed costs cancel); the
ratio is the median over rounds of variant / plain of the same round, with its spread (min–max, IQR)
beside it. A first warm-up round (1 step each) is discarded. P3S at weight 0 installs nothing, so its
ratio is the run's noise: it must land within 0.97–1.03 (``tests/unit/test_bench_timing.py``).
Random weights of the exact SD1.5 / CLIP ViT-L/14 / ControlNet shapes, so the arithmetic is real.

Attention: ``sdpa`` = ``--use-pytorch-cross-attention`` (PyTorch SDPA, what GPU users get), in a
child process (ComfyUI picks its kernel at import). ComfyUI's CPU default (sub-quadratic, chunked)
is not benchmarked (issue 24 item 3): there P3S routes its 16 extended self-attentions to SDPA
(``attention_route.ExtendedAttentionRoute``) while plain stays on sub-quad, so the ratio would mix
two kernels; with plain routed the same way the column would repeat the SDPA one.

    scripts/bench.sh                                   # 256 and 512, writes benchmarks/results/
    scripts/bench.sh --sizes 512 --steps 3 --reps 6 --variants plain,p3s,"p3s weight 0" --skip-train
    scripts/readme_figures.py                          # then: the README's block from bench.json

Variants: plain, + P3S, + ControlNet, + P3S + ControlNet, P3S at weight 0, "p3s, speed-ups off"
(the same P3S model with the exact speed-ups of issue 14 switched off: CFG-row sharing in the copy
and the SDPA route of the extended self-attention; the zero convs stay token linears), so
before/after come from the same run; the opt-in pooled level-0 keys; one and two regional
injectors (issue 16). :func:`output_effects` measures how far the opt-in (and the speed-ups) move
one step's output, relative to P3S's own effect.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import harness  # noqa: E402
import results_file  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
import timing  # noqa: E402

VARIANTS = ["plain", "p3s", "controlnet", "p3s+controlnet", "p3s weight 0", "p3s, speed-ups off",
            "p3s, level-0 keys pooled", "p3s region (left half)", "p3s 2 regions (left + right)"]
ATTENTION = ("sdpa",)
#: Issue 14's goals at 512^2 (same run, same backend).
GOALS = {"p3s_max_ratio": 1.3, "weight0_max_ratio": 1.02, "rngr_max_ms": 50.0}


def summary(xs):
    xs = sorted(xs)
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "n": len(xs)}


def machine() -> dict:
    """CPU, cores, RAM, torch and its threads, Python, OS (the stamp every result file carries)."""
    return results_file.machine_facts()


# --- the sampling benchmark (one backend, in a child process) ---------------------------------------
class _SpeedupsOff:
    """The P3S model with the exact speed-ups switched off for the duration of one run: the copy's
    CFG-row sharing and the SDPA route of the extended self-attention (the zero convs stay token
    linears, the K/V stay built in one pass)."""

    def __init__(self, adapter, backend):
        self.adapter, self.route = adapter, backend.ExtendedAttentionRoute

    def __enter__(self):
        self.saved = self.adapter.copy.share_cfg_rows, self.route.enabled
        self.adapter.copy.share_cfg_rows = False
        self.route.enabled = False

    def __exit__(self, *exc):
        self.adapter.copy.share_cfg_rows, self.route.enabled = self.saved


def _setups(m) -> dict:
    return {"plain": (m["model"], m["pos"], m["neg"]), "p3s": (m["p3s"], m["pos"], m["neg"]),
            "controlnet": (m["model"], m["cpos"], m["cneg"]), "p3s+controlnet": (m["p3s"], m["cpos"], m["cneg"]),
            "p3s weight 0": (m["p3s0"], m["pos"], m["neg"]), "p3s, speed-ups off": (m["p3s"], m["pos"], m["neg"]),
            "p3s, level-0 keys pooled": (m["p3s_pooled"], m["pos"], m["neg"]),
            "p3s region (left half)": (m["reg1"], m["pos"], m["neg"]),
            "p3s 2 regions (left + right)": (m["reg2"], m["pos"], m["neg"])}


def _one_step(nodes, model, pos, neg, size, seed=1):
    import torch

    latent = nodes.NODE_CLASS_MAPPINGS["EmptyLatentImage"]().generate(size, size, 1)[0]
    with torch.inference_mode():
        out = nodes.NODE_CLASS_MAPPINGS["KSampler"]().sample(model, seed, 1, 7.5, "ddim", "normal", pos, neg,
                                                             latent, denoise=1.0)[0]
    return out["samples"].float()


def output_effects(nodes, m, size) -> dict:
    """How far the opt-in pooled level-0 keys, and the exact speed-ups, move one DDIM step's latent
    from exact P3S, relative to P3S's own effect (exact P3S minus plain): 0 = no change, 1 = as
    large as the whole injection. Same seed, same noise."""
    plain = _one_step(nodes, m["model"], m["pos"], m["neg"], size)
    exact = _one_step(nodes, m["p3s"], m["pos"], m["neg"], size)
    pooled = _one_step(nodes, m["p3s_pooled"], m["pos"], m["neg"], size)
    with _SpeedupsOff(m["adapter"], m["backend"]):
        off = _one_step(nodes, m["p3s"], m["pos"], m["neg"], size)
    effect = exact - plain

    def rel(x):
        d = x - exact
        return {"max": float(d.abs().max() / effect.abs().max()), "rms": float(d.norm() / effect.norm())}

    return {"p3s_effect_rms": float(effect.pow(2).mean().sqrt()), "pooled_vs_exact": rel(pooled),
            "speedups_off_vs_on": rel(off)}


def bench_steps(nodes, models, size, args):
    """Per-step time of each variant per round (N-step minus 1-step sample, interleaved, the order
    reversed every other round, a warm-up round discarded, a sample disturbed by other work on the
    machine repeated: :func:`timing.measure`) and the ratios to plain with their spread."""
    import contextlib

    import torch

    setups = _setups(models)
    latent = nodes.NODE_CLASS_MAPPINGS["EmptyLatentImage"]().generate(size, size, 1)[0]
    sampler = nodes.NODE_CLASS_MAPPINGS["KSampler"]()

    def run(name, steps):
        m, p, n = setups[name]
        ctx = _SpeedupsOff(models["adapter"], models["backend"]) if name == "p3s, speed-ups off" \
            else contextlib.nullcontext()
        with ctx:
            t0, c0 = time.perf_counter(), time.process_time()
            with torch.inference_mode():
                sampler.sample(m, 1, steps, 7.5, "ddim", "normal", p, n, latent, denoise=1.0)
            return time.perf_counter() - t0, time.process_time() - c0

    variants = args.variants
    # the warm-up round (loads, allocations): discarded; its core shares set the contention floor
    shares = [timing.core_share(*run(name, 1)) for name in variants]
    floor = timing.contention_floor(shares) if args.retries else 0.0
    per_round = {name: [] for name in variants}
    raw = []
    for rnd in range(args.reps):
        if rnd >= 3 and args.stop_at and time.time() + round_s > args.stop_at:
            print(f"[bench] --stop-at: {rnd} rounds of {args.reps}", file=sys.stderr, flush=True)
            break
        t, got, t0 = {}, {}, time.time()
        for name, steps in timing.round_order(variants, rnd, args.steps):
            got[name, steps] = timing.measure(lambda: run(name, steps), floor, args.retries)
            t[name, steps] = got[name, steps]["wall_s"]
        round_s = time.time() - t0
        for name in variants:
            per_round[name].append(timing.per_step(t[name, args.steps], t[name, 1], args.steps))
        raw.append({"order": [name for name, steps in timing.round_order(variants, rnd, args.steps)
                              if steps == args.steps],
                    "seconds": {f"{name} x{steps}": v for (name, steps), v in t.items()},
                    "cores_floor": floor,
                    "attempts": {f"{name} x{steps}": v["attempts"] for (name, steps), v in got.items()},
                    "disturbed": [f"{name} x{steps}" for (name, steps), v in got.items() if v["disturbed"]]})
        print(f"[bench] {size}^2 round {rnd + 1}/{args.reps}: " + ", ".join(
            f"{name} {per_round[name][-1]:.3f}" for name in variants) + " s/step", file=sys.stderr, flush=True)
    out = timing.ratio_stats(per_round)
    return out, raw


def goals(steps: dict) -> dict:
    """Issue 14's goals and issue 24's noise check; a goal whose variants were not run is None."""
    r = {k: v["ratio_to_plain"] for k, v in steps.items()}
    has = lambda *names: all(n in r for n in names)  # noqa: E731
    additive = 1 + (r["p3s"] - 1) + (r["controlnet"] - 1) if has("p3s", "controlnet") else None
    return {"p3s_le_1.3": r["p3s"] <= GOALS["p3s_max_ratio"] if has("p3s") else None,
            "p3s_below_controlnet": r["p3s"] < r["controlnet"] if has("p3s", "controlnet") else None,
            "p3s+controlnet_le_additive": r["p3s+controlnet"] <= additive
            if has("p3s+controlnet") and additive is not None else None, "additive_bound": additive,
            "weight0_le_1.02": r["p3s weight 0"] <= GOALS["weight0_max_ratio"] if has("p3s weight 0") else None,
            "weight0_within_3pct": timing.weight0_within_band(steps) if has("p3s weight 0") else None}


#: Rough wall time of one size's stage on a busy 2-core CPU (steps, warm-up, profile), seconds;
#: with --stop-at a stage starts only if it should end by then.
STAGE_ESTIMATE = {("sdpa", 512): 720}


def past(stop_at: float | None, attention: str | None = None, size: int | None = None) -> bool:
    if stop_at is None:
        return False
    need = 0 if size is None else STAGE_ESTIMATE.get((attention, size), 240 * max(1.0, (size / 256) ** 2))
    return time.time() + need > stop_at


def child(args):
    """One attention backend: boot ComfyUI, then per size the steps benchmark and the profile.
    The JSON is rewritten after each size, so a run stopped later keeps what it measured."""
    import gc
    import importlib

    import profile_step as prof

    nodes, pack, kernel = prof.boot(args.attention, args.device)
    layer_map = importlib.import_module(f"{pack.__name__}.p3s_core.copy_unet").LAYER_MAP
    runs = []
    for i, size in enumerate(args.sizes):
        if past(args.stop_at, args.attention, size):
            print(f"[bench] --stop-at: {args.attention} {size}^2 would not end in time, not measured",
                  file=sys.stderr)
            runs.append({"attention": args.attention, "size": size, "error": "not run (--stop-at)"})
            Path(args.child_json).write_text(json.dumps(runs))
            continue
        models = prof.build_models(nodes, pack, size)
        t0 = time.time()
        try:
            steps, rounds = bench_steps(nodes, models, size, args)
        except Exception as e:  # keep the other sizes; the report says what failed
            runs.append({"attention": args.attention, "size": size, "error": repr(e)[:500]})
            Path(args.child_json).write_text(json.dumps(runs))
            continue
        row = {"attention": args.attention, "kernel": kernel, "size": size,
               "steps_per_variant": steps, "rounds": rounds, "goals": goals(steps)}
        if not args.skip_effects:
            try:
                row["output_effects"] = output_effects(nodes, models, size)
            except Exception as e:
                row["output_effects_error"] = repr(e)[:500]
        if not args.skip_profile and not past(args.stop_at):
            m = models
            try:
                row["profile"] = prof.profile_step(nodes, m["model"], m["p3s"], m["adapter"], m["pos"], m["neg"],
                                                   size, args.profile_reps, layer_map)
            except Exception as e:
                row["profile_error"] = repr(e)[:500]
        row["wall_seconds"] = time.time() - t0
        runs.append(row)
        Path(args.child_json).write_text(json.dumps(runs))
        del models
        gc.collect()


# --- the rest (parent process) ---------------------------------------------------------------------
def bench_rngr(args):
    import numpy as np

    sys.path.insert(0, str(REPO))
    from p3s_core import points, rngr

    rng = np.random.default_rng(0)
    img = rng.random((512, 512, 3)).astype(np.float32)
    tokens = rng.standard_normal((257, 1024)).astype(np.float32)
    _, box = rngr.letterbox(img, size=224)
    pts = points.ImagePoints(positive=[(200.0, 220.0)], negative=[(400.0, 300.0)])
    times, letterbox_times = [], []
    for _ in range(max(args.reps * 4, 8)):
        t0 = time.perf_counter()
        rngr.letterbox(img, size=224)
        letterbox_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        rngr.rngr_mask(tokens, box, pts, (512, 512), sigma=0.75, grow=4)
        times.append(time.perf_counter() - t0)
    total = [(a + b) * 1000 for a, b in zip(times, letterbox_times)]
    return {"mask_ms_512": summary([t * 1000 for t in times]),
            "letterbox_ms_512": summary([t * 1000 for t in letterbox_times]),
            "mask_plus_letterbox_ms_512": summary(total),
            "goal_le_50ms": statistics.median(total) <= GOALS["rngr_max_ms"]}


def bench_import(args):
    """Pack import time as ComfyUI's loader sees it, in a fresh interpreter each time."""
    code = f"""
import sys, asyncio, time
sys.path.insert(0, {str(harness.comfyui_dir())!r})
import comfy.cli_args; comfy.cli_args.args.cpu = True
import folder_paths, utils.extra_config, nodes
t0 = time.perf_counter(); ok = asyncio.run(nodes.load_custom_node({str(REPO)!r})); print(time.perf_counter() - t0, ok)
"""
    times = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stdout.split()
        times.append(float(out[-2]))
    return {"seconds": summary(times)}


def bench_train(args):
    """benchmarks/bench_train.py in its own process (its peak memory is the process's), with and
    without gradient checkpointing; the last JSON line of each configuration is kept. The epoch
    time is measured over a real epoch of ``--train-images`` photos (the Trainer's own loop)."""
    rows = []
    res = args.train_resolution or (512 if args.device == "cuda" else 64)
    for ckpt in ("off", "on"):
        cmd = [sys.executable, str(REPO / "benchmarks" / "bench_train.py"), "--resolution", str(res),
               "--steps", str(args.train_steps), "--checkpointing", ckpt,
               "--epoch-images", str(args.train_images)] + (["--cpu"] if args.device == "cpu" else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            rows.append({"gradient_checkpointing": ckpt == "on", "error": proc.stderr[-500:]})
            continue
        rows.append(json.loads(lines[-1]))
    return rows


def _previous(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _origin(previous: dict) -> dict:
    return {"date": previous.get("date"), "command": previous.get("command"), "machine": previous.get("machine")}


def carry_over(row: dict, previous: dict) -> dict:
    """A section this run skipped (``--skip-profile``, ``--skip-effects``) taken from the previous
    bench.json's run of the same attention and size, marked with that run's date and command."""
    old = next((r for r in previous.get("runs", []) if "error" not in r and "error" not in row
                and (r.get("attention"), r.get("size")) == (row.get("attention"), row.get("size"))), None)
    if old is None:
        return row
    for key in ("profile", "output_effects"):
        if key not in row and key in old:
            row[key] = old[key]
            row[f"{key}_from"] = old.get(f"{key}_from") or _origin(previous)
    return row


def write_report(result, out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    sys.path.insert(0, str(REPO / "scripts"))
    import readme_figures

    text = readme_figures.render(result)
    (out_dir / "bench.md").write_text(text)
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256,512", help="comma-separated image sizes (pixels)")
    ap.add_argument("--size", type=int, help="one size (same as --sizes N)")
    ap.add_argument("--attention", default="sdpa",
                    help="sdpa (--use-pytorch-cross-attention); ComfyUI's sub-quad default is not benchmarked "
                         "(P3S routes its layers to SDPA there: not like for like)")
    ap.add_argument("--steps", type=int, default=3, help="N of the N-step sample (the 1-step one is subtracted)")
    ap.add_argument("--reps", type=int, default=5, help="timed rounds (after one warm-up round)")
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS, metavar="VARIANT",
                    help="the variants to time (plain always): " + "; ".join(VARIANTS))
    ap.add_argument("--retries", type=int, default=2,
                    help="repeat a timed sample at most this often while the process got under 85 %% of the "
                         "warm-up round's best core share (other work on the machine); 0: never")
    ap.add_argument("--profile-reps", type=int, default=2)
    ap.add_argument("--skip-profile", action="store_true",
                    help="no profile; the previous bench.json's profile of the same size is kept, marked")
    ap.add_argument("--skip-effects", action="store_true",
                    help="no output effects; the previous bench.json's are kept, marked")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--train-steps", type=int, default=3, help="timed training steps (the first is a warm-up)")
    ap.add_argument("--train-images", type=int, default=5, help="photos in the timed training epoch")
    ap.add_argument("--train-resolution", type=int, default=0, help="default: 64 on the CPU, 512 on CUDA")
    ap.add_argument("--skip-train", action="store_true",
                    help="no training benchmark; the previous bench.json's is kept, marked")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--stop-at", type=float, default=None,
                    help="unix time after which no new stage starts (what was measured is written)")
    ap.add_argument("--child-json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.sizes = [args.size] if args.size else [int(s) for s in args.sizes.split(",") if s]
    args.variants = ["plain"] + [v for v in VARIANTS if v in args.variants and v != "plain"]
    if args.steps < 2:
        ap.error("--steps must be 2 or more (the per-step time is an N-step minus a 1-step sample)")
    backends = [a for a in args.attention.split(",") if a]
    if not set(backends) <= set(ATTENTION):
        ap.error(f"--attention takes {', '.join(ATTENTION)}")
    if args.child_json:
        args.attention = backends[0]
        return child(args)

    t0 = time.time()
    given = list(sys.argv[1:] if argv is None else argv)
    for flag in ("--stop-at", "--out"):  # a time limit and a destination, not settings of the measurement
        if flag in given:
            i = given.index(flag)
            del given[i:i + 2]
    command = "scripts/bench.sh " + " ".join(f'"{a}"' if " " in a else a for a in given)
    result = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": command.strip(), "machine": machine(), "device": args.device,
              "sizes": args.sizes, "steps": args.steps, "reps": args.reps, "variants": args.variants,
              "method": "per round: each variant's N-step and 1-step sample, interleaved, the order reversed "
                        "every other round, after a discarded warm-up round; s/step = (t_N - t_1) / (N - 1); "
                        "ratio = median over rounds of variant / plain of the same round; a sample during which "
                        "the process got under 85 % of the warm-up's best core share (CPU time / wall time) "
                        "is repeated, at most --retries times",
              "sampler": "ddim, CFG 7.5, batch 1", "runs": []}
    previous = _previous(args.out / "bench.json")

    def save():  # after every stage: a run stopped later keeps what it measured
        result["wall_seconds"] = time.time() - t0
        return write_report(result, args.out)

    for backend in backends:
        if past(args.stop_at, backend, min(args.sizes)):
            result["runs"].append({"attention": backend, "error": "not run (--stop-at)"})
            continue
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            child_json = f.name
        cmd = [sys.executable, str(Path(__file__).resolve()), "--attention", backend,
               "--sizes", ",".join(map(str, args.sizes)), "--steps", str(args.steps),
               "--reps", str(args.reps), "--retries", str(args.retries), "--profile-reps", str(args.profile_reps),
               "--device", args.device, "--child-json", child_json, "--variants", *args.variants]
        cmd += (["--skip-profile"] if args.skip_profile else []) + \
            (["--skip-effects"] if args.skip_effects else []) + \
            (["--stop-at", str(args.stop_at)] if args.stop_at else [])
        print(f"[bench] {backend}: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, timeout=4 * 3600)
        text = Path(child_json).read_text() if Path(child_json).exists() else ""
        runs = json.loads(text) if text.strip() else []
        result["runs"] += [carry_over(r, previous) for r in runs]
        if proc.returncode != 0:
            result["runs"].append({"attention": backend, "error": f"exit code {proc.returncode} "
                                   f"after {len(runs)} size(s)"})
        os.unlink(child_json)
        save()
    result["rngr"] = bench_rngr(args)
    result["import"] = bench_import(args)
    save()
    if not args.skip_train and not past(args.stop_at):
        result["train"] = bench_train(args)
    elif previous.get("train"):
        result["train"] = previous["train"]
        result["train_from"] = previous.get("train_from") or _origin(previous)
    print(save())
    print(f"\nwritten: {args.out}/bench.json, bench.md ({result['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
