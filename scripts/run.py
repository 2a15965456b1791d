"""Start the real ComfyUI with this pack, or run one workflow headless through it.

Called by ``scripts/run.sh`` after set-up. See ``--help``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

BANNER = """
==============================================================================
 NO --models GIVEN: using RANDOM-WEIGHT demo models. Everything they generate
 is NOISE. Pass --models /path/to/ComfyUI/models to use your own SD1.5,
 CLIP ViT-L/14 vision and ControlNet files.
==============================================================================
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, default=int(os.environ.get("P3S_PORT", "8188")),
                    help="port on 127.0.0.1 (default 8188; 0 picks a free one)")
    ap.add_argument("--models", type=Path, default=None,
                    help="your ComfyUI models folder (checkpoints/, clip_vision/, controlnet/, p3s/)")
    ap.add_argument("--workflow", type=Path, default=None,
                    help="a workflow JSON (UI or API format) to run headless; prints the files it wrote")
    ap.add_argument("--base", type=Path, default=harness.REPO / ".p3s" / "run",
                    help="ComfyUI base directory (custom_nodes/, input/, output/, user/); default .p3s/run")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds a workflow may run")
    args = ap.parse_args(argv)

    if args.models is not None and not args.models.is_dir():
        ap.error(f"--models {args.models} is not a folder")
    if args.workflow is not None and not args.workflow.is_file():
        ap.error(f"--workflow {args.workflow} is not a file")
    if args.models is None:
        print(BANNER, file=sys.stderr, flush=True)
    base = harness.make_base_dir(args.base, models_dir=args.models)

    if args.workflow is None:
        port = args.port or harness.free_port()
        print(f"ComfyUI with P3S on http://127.0.0.1:{port} (Ctrl+C stops it)", flush=True)
        os.chdir(harness.comfyui_dir())
        os.execv(sys.executable, [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                                  "--disable-auto-launch", "--base-directory", str(base),
                                  "--database-url", "sqlite:///:memory:"])

    data = json.loads(args.workflow.read_text())
    server = harness.ComfyServer(base=base, port=args.port if args.port else 0)
    try:
        server.start()
        prompt = harness.ui_to_api(data, server.get("/object_info")) if harness.is_ui_workflow(data) else data
        entry = server.run(prompt, timeout=args.timeout)
        files = server.output_files(entry)
        if not files:
            print("the workflow ran but wrote no output file", file=sys.stderr)
            return 1
        for f in files:
            print(f.resolve())
        return 0
    except harness.HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
