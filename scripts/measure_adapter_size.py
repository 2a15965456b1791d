"""The SD1.5 adapter's size, measured on a real file (issue 24 item 2): parameters of the trainable
copy (Eq. 6, its 16 zero convs included) and of the reference encoder (Eq. 4-5), the file's bytes
with no stored reference, and what each stored photo adds (its VAE latent and CLIP ViT-L/14 hidden
states, float32, as the Trainer stores them; :func:`p3s_core.comfyui_engine.training.stored_reference`).

    $P3S_VENV/bin/python scripts/measure_adapter_size.py --out benchmarks/results/adapter_size.json

Seconds on a CPU; no ComfyUI, no model file (the shapes are SD1.5's; the values do not change the size).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512, help="training resolution of the stored photos")
    ap.add_argument("--photos", type=int, default=5, help="stored photos in the largest file measured")
    ap.add_argument("--out", default=None, help="write the result file (scripts/results_file.py)")
    args = ap.parse_args(argv)
    import torch

    from p3s_core.adapter import new_adapter, save_adapter

    adapter = new_adapter(seed=0)
    zero = sum(_count(c) for c in adapter.copy.zero_convs.values())
    grid = args.size // 8
    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (0, 1, args.photos):
            g = torch.Generator().manual_seed(n)
            adapter.reference = None if n == 0 else {
                "latent": torch.randn(n, 4, grid, grid, generator=g),
                "clip_hidden": torch.randn(n, 257, 1024, generator=g)}
            files[n] = save_adapter(adapter, Path(tmp) / f"a{n}.safetensors").stat().st_size
    result = {"kind": "adapter_size", "resolution": args.size, "dtype": "float32",
              "params": {"copy": _count(adapter.copy), "zero_convs": zero, "encoder": _count(adapter.encoder),
                         "total": _count(adapter)},
              "weight_bytes": sum(p.numel() * p.element_size() for p in adapter.parameters()),
              "file_bytes": {str(n): b for n, b in files.items()},
              "per_photo_bytes": (files[args.photos] - files[0]) / args.photos}
    print(result)
    if args.out:
        import results_file

        results_file.write(args.out, result, None if argv is None else [sys.argv[0], *argv])
    return result


if __name__ == "__main__":
    main()
