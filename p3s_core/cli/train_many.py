"""``p3s train-many SUBJECTS_DIR``: one adapter per subject, sharded over processes and hosts.

Runs the same under ``accelerate launch`` and ``torchrun`` (both set ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK``; a plain ``python -m p3s`` is rank 0 of 1):

* subjects (sub-folders of photos, sorted by name) are sharded by rank: rank r trains subjects
  ``r, r + W, r + 2W, ...``, one at a time;
* a subject whose adapter is complete (the file exists and its recorded step count is
  ``epochs x photos``) is skipped, so a rerun finishes what a killed process left;
* adapters are written atomically (temporary file + rename, :func:`p3s_core.safe_io`), so a killed
  process never leaves a half file under the final name;
* every training appends one line to ``OUT/p3s_many_log.jsonl``; at the end rank 0 writes
  ``OUT/summary.json``: every subject, complete or missing. Under a launcher (a process group) each
  rank takes its own GPU and the group is used once, at the start; completion goes through files
  (``OUT/.p3s_ranks/``), so a rank with nothing to do never waits in a collective past NCCL's
  timeout, and a rerun with nothing left exits 0 and still writes the summary.

Determinism: every subject trains with the same ``--seed`` whatever its rank, so an adapter is
byte-identical to a single-process run on the same device type and thread count (torchrun sets
``OMP_NUM_THREADS=1`` per process; set it alike for a single-process comparison).

The prompt of a subject: ``SUBJECT/prompt.txt`` if present, else ``--prompt`` with ``{class}``
(``SUBJECT/class.txt``, the DreamBench class of a DreamBench subject name, or the folder name) and
``{identifier}`` filled in.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from ..errors import P3SError

DEFAULT_PROMPT = "a photo of {identifier} {class}"


class ManySubjectsError(P3SError):
    """A subjects folder or a distributed setting that cannot be used."""


def rank_world() -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` from the launcher's environment (accelerate / torchrun)."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise ManySubjectsError("RANK/WORLD_SIZE", f"not integers ({exc})",
                                "launch with accelerate launch or torchrun") from exc
    if world < 1 or not 0 <= rank < world:
        raise ManySubjectsError("RANK/WORLD_SIZE", f"rank {rank} of {world}", "launch with accelerate launch or torchrun")
    return rank, world, local


def subjects_of(folder) -> list[Path]:
    from .common import IMAGE_EXT

    root = Path(folder)
    if not root.is_dir():
        raise ManySubjectsError("subjects", f"{root} is not a folder",
                                "pass a folder with one sub-folder of photos per subject")
    subs = sorted(p for p in root.iterdir() if p.is_dir()
                  and any(f.suffix.lower() in IMAGE_EXT for f in p.iterdir()))
    if not subs:
        raise ManySubjectsError("subjects", f"{root} has no sub-folder with photos",
                                "put each subject's 3-5 photos in SUBJECTS_DIR/<subject>/")
    return subs


def prompt_for(subject: Path, template: str, identifier: str) -> str:
    if (subject / "prompt.txt").is_file():
        return (subject / "prompt.txt").read_text().strip()
    from .evaluation import SUBJECTS

    if (subject / "class.txt").is_file():
        cls = (subject / "class.txt").read_text().strip()
    else:
        cls = SUBJECTS.get(subject.name, subject.name.replace("_", " "))
    return template.replace("{identifier}", identifier).replace("{class}", cls)


def is_complete(path: Path, steps: int) -> bool:
    """True when ``path`` is an adapter whose training record says ``steps`` steps."""
    from ..safe_io import read_safetensors_header

    if not path.is_file():
        return False
    try:
        meta, _ = read_safetensors_header(path)
        return int(json.loads(meta.get("training", "{}")).get("steps", -1)) == int(steps)
    except Exception:  # unreadable or foreign: train it again (atomic write replaces it)
        return False


def _append_log(out: Path, record: dict) -> None:
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(out / "p3s_many_log.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _process_group(world: int, local: int, device: str):
    """A torch.distributed group when the launcher provides one (MASTER_ADDR) and W > 1; on CUDA each
    rank first takes its own device (``cuda:LOCAL_RANK``), as NCCL needs. The group is used once, at
    the start (:func:`_run_token`): completion goes through files, so no rank waits in a collective
    while another trains (NCCL's timeout would take the job down)."""
    if world < 2 or not os.environ.get("MASTER_ADDR"):
        return None
    import datetime

    import torch
    import torch.distributed as dist

    nccl = device.startswith("cuda") and torch.cuda.is_available()
    if nccl:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get("P3S_DIST_TIMEOUT_S", "600")))
        dist.init_process_group("nccl" if nccl else "gloo", timeout=timeout)
    return dist


def _run_token(dist, rank: int) -> str:
    """One id shared by every rank of this launch (rank 0's, broadcast once at the start)."""
    import uuid

    box = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])


def _mark_done(out: Path, token: str, rank: int) -> None:
    folder = out / ".p3s_ranks" / token
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"rank-{rank}.tmp"
    tmp.write_text(str(rank))
    os.replace(tmp, folder / f"rank-{rank}.done")


def _wait_for_ranks(out: Path, token: str, world: int, poll: float = 1.0) -> None:
    """Rank 0 waits, without a collective and without a timeout, until every rank of this launch
    has marked its work done (a rank that dies ends the launch: the launcher stops the others)."""
    folder = out / ".p3s_ranks" / token
    t0 = last = time.time()
    while True:
        done = {p.name for p in folder.glob("rank-*.done")} if folder.is_dir() else set()
        if len(done) >= world:
            break
        if time.time() - last > 60:
            last = time.time()
            print(f"P3S train-many: rank 0 waits for {world - len(done)} rank(s) ({time.time() - t0:.0f} s)",
                  flush=True)
        time.sleep(poll)
    shutil.rmtree(out / ".p3s_ranks" / token, ignore_errors=True)


def cmd_train_many(args) -> int:
    from .common import (list_images, load_clip_vision, pick_device, pick_dtype, set_threads, settings_from, train_one,
                         write_config)

    set_threads(args.threads)
    rank, world, local = rank_world()
    settings = settings_from(args)
    subjects = subjects_of(args.subjects)
    plan = []
    for s in subjects:  # every input is checked before any work, on every rank
        photos = list_images(s, f"subjects/{s.name}")
        prompt = prompt_for(s, args.prompt, args.identifier)
        settings.validate(prompt)
        plan.append((s, photos, prompt, settings.epochs * len(photos)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        write_config(out, "train-many", args)
    mine = plan[rank::world]
    todo = [p for p in mine if not is_complete(out / f"{p[0].name}.safetensors", p[3])]
    print(f"P3S train-many: rank {rank}/{world}: {len(mine)} subject(s), {len(mine) - len(todo)} already complete",
          flush=True)
    dev = pick_device(args.device)
    if dev == "cuda":
        dev = f"cuda:{local}"
    dist = _process_group(world, local, dev)
    token = _run_token(dist, rank) if dist is not None else None
    if dist is not None:
        dist.destroy_process_group()  # nothing more goes through it (see _process_group)
    if todo:
        from .. import diffusers_engine as db

        pipe = db.load_pipeline(args.model, tokenizer=args.tokenizer, dtype=pick_dtype(args.dtype), device=dev)
        clip = load_clip_vision(args.clip_vision, dev)
        for s, photos, prompt, steps in todo:
            t0 = time.time()
            res = train_one(pipe, clip, photos, prompt, settings, out / f"{s.name}.safetensors",
                            progress=rank == 0 or world == 1, desc=f"[rank {rank}] {s.name}",
                            copy_layout=args.copy_layout)
            _append_log(out, {"subject": s.name, "rank": rank, "steps": res.steps,
                              "loss": res.losses[-1], "seconds": round(time.time() - t0, 2)})
    if token is not None:
        _mark_done(out, token, rank)
        if rank == 0:
            _wait_for_ranks(out, token, world)
    if rank == 0:
        summary = {"world_size": world, "subjects": {}}
        for s, _photos, prompt, steps in plan:
            done = is_complete(out / f"{s.name}.safetensors", steps)
            summary["subjects"][s.name] = {"complete": done, "steps": steps, "prompt": prompt,
                                           "adapter": f"{s.name}.safetensors" if done else None}
        summary["complete"] = sum(v["complete"] for v in summary["subjects"].values())
        summary["missing"] = [k for k, v in summary["subjects"].items() if not v["complete"]]
        tmp = out / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, out / "summary.json")
        print(f"P3S train-many: {summary['complete']}/{len(plan)} subject(s) complete"
              + (f"; missing (rerun the same command): {', '.join(summary['missing'])}" if summary["missing"] else ""),
              flush=True)
    return 0


def add_parser(sub, fmt, common_models, train_args):
    p = sub.add_parser("train-many", formatter_class=fmt,
                       help="one adapter per subject folder; shards over accelerate launch / torchrun processes",
                       description="One adapter per subject, one subject per process at a time, sharded by rank. "
                       "Run it plainly, or under 'accelerate launch -m p3s train-many ...' or "
                       "'torchrun --nproc_per_node N -m p3s train-many ...'; a rerun skips complete adapters.")
    p.add_argument("subjects", help="folder with one sub-folder of photos per subject (optional prompt.txt / class.txt)")
    p.add_argument("--out", required=True, help="folder for <subject>.safetensors, p3s_many_log.jsonl, summary.json")
    common_models(p)
    train_args(p)
    p.set_defaults(func=cmd_train_many, prompt=DEFAULT_PROMPT)
    return p
