"""The step-time cost of the P3S Trainer's ``reproducible`` option on the CPU (one intra-op thread
during the training steps, :func:`p3s_core.train.reproducible_threads`), measured interleaved:
one frozen UNet, one adapter and one step function, then rounds of ``--steps`` timed steps on one
thread and on torch's default thread count, alternating (forward + backward + AdamW step each).

    # real ComfyUI + the random SD1.5 / CLIP ViT-L (paths as scripts/test.sh exports them)
    source scripts/env.sh
    /work/bin/heavy $P3S_VENV/bin/python scripts/bench_reproducible.py --resolution 64 --rounds 3 --steps 3

Prints one JSON line: the median step time per thread count and their ratio; ``--out FILE`` also
writes it as a result file (scripts/results_file.py), e.g. ``benchmarks/results/reproducible.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each: one thread, then the default)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round and thread count")
    ap.add_argument("--checkpoint", default="p3s_random_sd15.safetensors")
    ap.add_argument("--clip-vision", default="p3s_random_clip_vit_l14.safetensors")
    ap.add_argument("--out", default=None, help="also write the result file (scripts/results_file.py)")
    args = ap.parse_args(argv)

    import torch

    sys.path.insert(0, str(REPO / "scripts"))
    import harness

    base = harness.make_base_dir(Path(tempfile.mkdtemp(prefix="p3s_bench_repro_")))
    nodes, pack = harness.boot_in_process(base, cpu=True)
    core = lambda name: __import__(f"{pack.__name__}.p3s_core.{name}", fromlist=["x"])  # noqa: E731
    tr, train = core("comfyui_engine"), core("train")
    with torch.inference_mode():
        model, clip, vae = nodes.NODE_CLASS_MAPPINGS["CheckpointLoaderSimple"]().load_checkpoint(args.checkpoint)[:3]
        clip_vision = nodes.NODE_CLASS_MAPPINGS["CLIPVisionLoader"]().load_clip(args.clip_vision)[0]
        images = torch.rand(1, args.resolution, args.resolution, 3, generator=torch.Generator().manual_seed(0))
        batches = tr.cache_inputs(model, clip, vae, clip_vision, images, "a photo of sks dog",
                                  resolution=args.resolution)
    settings = train.TrainSettings(epochs=1, resolution=args.resolution)
    device = torch.device("cpu")
    with torch.inference_mode():  # as ComfyUI runs the Trainer node
        unet = tr.frozen_unet_copy(model, device)
        adapter = tr.new_training_adapter(unet)
        ctx = tr.build_step_fn(model, adapter, settings, unet=unet, device=device, gradient_checkpointing=False)
    default = torch.get_num_threads()
    times = {1: [], default: []}
    b = batches[0]
    try:
        with torch.inference_mode(False), torch.enable_grad():
            adapter.train()
            params = train.trainable_parameters(adapter)
            opt = train.make_optimizer(params, settings)
            gen = torch.Generator().manual_seed(0)

            def step():
                opt.zero_grad(set_to_none=True)
                l_ldm, l_ac = ctx.step_fn(adapter, b.latent, b.context, b.clip_hidden, gen)
                (l_ldm + settings.gamma * l_ac).backward()
                opt.step()

            step()  # warm-up
            for _ in range(args.rounds):
                for n in (1, default):
                    with train.reproducible_threads(device, enabled=(n == 1)):
                        for _ in range(args.steps):
                            t0 = time.perf_counter()
                            step()
                            times[n].append(time.perf_counter() - t0)
    finally:
        ctx.close()
    med = {n: statistics.median(v) for n, v in times.items()}
    row = {"resolution": args.resolution, "rounds": args.rounds, "steps": args.steps,
           "default_threads": default, "median_step_s_1_thread": round(med[1], 3),
           f"median_step_s_{default}_threads": round(med[default], 3),
           "ratio_1_thread_over_default": round(med[1] / med[default], 3)}
    print(json.dumps(row), flush=True)
    if args.out:
        import results_file

        results_file.write(args.out, {"kind": "reproducible", **row, "step_s_1_thread": times[1],
                                      "step_s_default_threads": times[default]},
                           None if argv is None else [sys.argv[0], *argv])
    return row


if __name__ == "__main__":
    main()
