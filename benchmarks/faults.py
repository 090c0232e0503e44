"""kill -9 anywhere: trials of killing a training run, resuming it, and comparing its losses with an unbroken run.

Each trial starts `repforce train` on the tiny preset (fp32 on every CPU) in a fresh folder, one process or two
gloo ranks under torchrun, and kills it with SIGKILL, either at a random moment or at a named point of a
checkpoint save:

    after_state     state.pt written, the rest of the step folder not yet
    after_model     model.safetensors (the EMA weights) written
    before_rename   the step folder complete under its temporary name, not yet renamed into place
    ema_export      a sharded save's EMA export half written (2 ranks)
    random          a random moment of the run (parent's timer)

then runs `repforce train --out D --resume` to the end and checks: the resume worked (exit 0), it started from
the newest complete checkpoint, and every step's logged loss (the last row logged for it) equals the unbroken
run's. Prints one JSON line per trial and a summary line: trials, recovered, identical, steps lost per kill.

    .venv/bin/python benchmarks/faults.py --trials 50      # or: bash benchmarks/run_all.sh faults

Named points are injected in the child (`--child POINT N`: the Nth save dies there), by wrapping the
functions that write a checkpoint; the package itself has no fault hooks.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = 16
SETS = ["--set", "train.log_every=1", "--set", "train.ckpt_every=3", "--set", "train.keep=2"]
POINTS_ONE = ["after_state", "after_model", "before_rename", "random"]
POINTS_TWO = ["after_model", "before_rename", "ema_export", "random"]


def child(point: str, nth: int, argv: list[str]) -> int:
    """Run the CLI with its nth checkpoint save killed at `point` (every rank counts its own saves)."""
    import torch

    from repforce import checkpoint
    from repforce.cli import main

    count, sharded = [0], os.environ.get("WORLD_SIZE", "1") != "1"

    def at(fn, before: bool = False, half: bool = False):
        def wrapped(*a, **k):
            count[0] += 1
            if count[0] == nth and before:
                os.kill(os.getpid(), signal.SIGKILL)
            out = fn(*a, **k)
            if count[0] == nth:
                if half and os.environ.get("RANK", "0") == "0":  # rank 0 wrote the file: leave half, as a kill mid-write
                    data = Path(a[1]).read_bytes()
                    Path(a[1]).write_bytes(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        return wrapped

    if point == "after_state":
        torch.save = at(torch.save)
    elif point == "after_model" and sharded:
        checkpoint.export_ema = at(checkpoint.export_ema)
    elif point == "after_model":
        checkpoint.save_file = at(checkpoint.save_file)
    elif point == "before_rename":
        checkpoint._publish = at(checkpoint._publish, before=True)
    elif point == "ema_export":
        checkpoint.export_ema = at(checkpoint.export_ema, half=True)
    else:
        raise SystemExit(f"unknown fault point {point!r}")
    return main(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(ranks: int, out: Path, extra: list[str], point: str | None = None, nth: int = 0) -> list[str]:
    train = ["train", "--quiet", "--out", str(out), *extra]
    if ranks == 1:
        head = [sys.executable, __file__, "--child", point, str(nth), "--"] if point else [
            sys.executable, "-m", "repforce.cli"]
        return head + train
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
              "127.0.0.1", "--master_port", str(free_port())]
    return launch + ([__file__, "--child", point, str(nth), "--"] if point else ["-m", "repforce.cli"]) + train


def run(cmd: list[str], timeout: float = 300, kill_after: float | None = None) -> tuple[int, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)  # its own process group: a kill reaches torchrun's workers
    try:
        out, _ = p.communicate(timeout=kill_after if kill_after is not None else timeout)
    except subprocess.TimeoutExpired:
        if kill_after is None:
            os.killpg(p.pid, signal.SIGKILL)
            raise
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        return -9, out
    try:  # a worker that outlived its killed sibling
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return p.returncode, out


def loss_rows(run_dir: Path) -> list[dict]:
    log = run_dir / "log.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return [r for r in rows if "loss" in r and "step" in r]


def step_losses(run_dir: Path) -> dict[int, float]:
    """The last loss logged for each step (a resumed run logs the replayed steps again)."""
    return {r["step"]: r["loss"] for r in loss_rows(run_dir)}


def trial(ranks: int, point: str, ref: dict[int, float], root: Path, rng: random.Random, span: float) -> dict:
    from repforce import checkpoint

    out = root / f"t{rng.getrandbits(32):08x}"
    extra = ["--preset", "tiny", "--variant", "pixel_rf", "--steps", str(STEPS), *SETS]
    n_saves = STEPS // 3
    if point == "random":
        delay = rng.uniform(0.5, 0.95 * span)
        code, log = run(command(ranks, out, extra), kill_after=delay)
        where = {"after_s": round(delay, 2)}
    else:
        nth = rng.randint(1, n_saves)
        code, log = run(command(ranks, out, extra, point, nth))
        where = {"save": nth}
    reached = max(step_losses(out), default=0)
    logged = len(loss_rows(out))
    complete = checkpoint.step_dirs(out / "checkpoints")
    newest = int(complete[-1].name[len(checkpoint.PREFIX):]) if complete else 0
    killed = code != 0
    if not killed:  # the kill came after the run ended: nothing to recover
        return {"ranks": ranks, "point": point, **where, "killed": False}
    # the newest complete checkpoint goes on; killed before the first one, the same command starts again
    code2, log2 = run(command(ranks, out, ["--resume"] if complete else extra))
    got = step_losses(out)
    same = code2 == 0 and all(got.get(s) == v for s, v in ref.items())
    after = loss_rows(out)[logged:]
    row = {"ranks": ranks, "point": point, **where, "killed": True, "reached": reached, "newest_complete": newest,
           "steps_lost": max(reached - newest, 0), "recovered": code2 == 0,
           "from_newest": bool(after) and after[0]["step"] == newest + 1, "identical": same}
    if not same:
        row["tail"] = (log2 or "")[-600:]
    shutil.rmtree(out, ignore_errors=True)
    return row


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        point, nth, rest = sys.argv[2], int(sys.argv[3]), sys.argv[5:]
        sys.exit(child(point, nth, rest))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=50, help="in all, split 60/40 between one process and two ranks")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    lines = []

    def emit(row):
        print(json.dumps(row), flush=True)
        lines.append(row)

    with tempfile.TemporaryDirectory(prefix="faults_") as tmp:
        root = Path(tmp)
        refs, spans = {}, {}
        for ranks in (1, 2):
            t0 = time.time()
            code, log = run(command(ranks, root / f"ref{ranks}", ["--preset", "tiny", "--variant", "pixel_rf",
                                                                  "--steps", str(STEPS), *SETS]))
            assert code == 0, log[-2000:]
            refs[ranks], spans[ranks] = step_losses(root / f"ref{ranks}"), time.time() - t0
        n_two = args.trials * 2 // 5
        plan = [(1, POINTS_ONE[i % len(POINTS_ONE)]) for i in range(args.trials - n_two)]
        plan += [(2, POINTS_TWO[i % len(POINTS_TWO)]) for i in range(n_two)]
        for ranks, point in plan:
            emit(trial(ranks, point, refs[ranks], root, rng, spans[ranks]))
    killed = [r for r in lines if r["killed"]]
    lost = sorted(r["steps_lost"] for r in killed)
    summary = {"summary": True, "trials": len(lines), "killed": len(killed),
               "recovered": sum(r["recovered"] for r in killed), "from_newest": sum(r["from_newest"] for r in killed),
               "identical": sum(r["identical"] for r in killed),
               "steps_lost_mean": round(sum(lost) / max(len(lost), 1), 2), "steps_lost_max": max(lost, default=0),
               "ckpt_every": 3, "steps": STEPS,
               "by_point": {f"{r}x{p}": sum(1 for x in killed if x["ranks"] == r and x["point"] == p and x["identical"])
                            for r, p in sorted({(x["ranks"], x["point"]) for x in killed})}}
    emit(summary)


if __name__ == "__main__":
    main()
