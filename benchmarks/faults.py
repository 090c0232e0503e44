"""kill -9 anywhere: trials of killing a training run, resuming it, and comparing its losses with an unbroken run.

Each trial starts `repforce train` on the tiny preset (fp32 on every CPU) in a fresh folder, one process or two
gloo ranks under torchrun, and kills it with SIGKILL, either at a random moment or at a named point of a
checkpoint save:

    after_state     state.pt written, the rest of the step folder not yet
    after_model     model.safetensors (the EMA weights) written
    before_rename   the step folder complete under its temporary name, not yet renamed into place
    ema_export      a sharded save's EMA export half written (2 ranks)
    random          a random moment of training: a random step, 0-150 ms after it was logged

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


def tree(pid: int) -> list[int]:
    """pid and all its descendants (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        q = todo.pop()
        out.append(q)
        todo += children.get(q, [])
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL to a process and every descendant at once, as when the machine under them dies."""
    for q in tree(pid):
        try:
            os.kill(q, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run(cmd: list[str], timeout: float = 300, kill_at: tuple[Path, int, float] | None = None) -> tuple[int, str]:
    """Run cmd to its end, its output captured; with kill_at = (run folder, step, delay), SIGKILL its whole process
    tree `delay` seconds after `step` is first logged (a moment inside training, not in its start-up)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with tempfile.TemporaryFile("w+") as log:
        p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        t0 = time.time()
        killed = False
        while p.poll() is None:
            if time.time() - t0 > timeout:
                kill_tree(p.pid)
                raise TimeoutError(f"{' '.join(cmd[:6])} ... ran past {timeout} s")
            if kill_at is not None and not killed and max(step_losses(kill_at[0]), default=0) >= kill_at[1]:
                time.sleep(kill_at[2])
                kill_tree(p.pid)
                killed = True
            time.sleep(0.005)
        kill_tree(p.pid)  # a worker that outlived its killed sibling
        log.seek(0)
        return (-9 if killed else p.returncode), log.read()


def loss_rows(run_dir: Path) -> list[dict]:
    log, rows = run_dir / "log.jsonl", []
    for line in log.read_text().splitlines() if log.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the line being written as we read
            pass
    return [r for r in rows if "loss" in r and "step" in r]


def step_losses(run_dir: Path) -> dict[int, float]:
    """The last loss logged for each step (a resumed run logs the replayed steps again)."""
    return {r["step"]: r["loss"] for r in loss_rows(run_dir)}


def trial(ranks: int, point: str, ref: dict[int, float], root: Path, rng: random.Random) -> dict:
    from repforce import checkpoint

    out = root / f"t{rng.getrandbits(32):08x}"
    extra = ["--preset", "tiny", "--variant", "pixel_rf", "--steps", str(STEPS), *SETS]
    n_saves = STEPS // 3
    if point == "random":  # at a random step, a random fraction of a step's time after it was logged
        at, delay = rng.randint(1, STEPS - 1), rng.uniform(0, 0.15)
        code, log = run(command(ranks, out, extra), kill_at=(out, at, delay))
        where = {"after_step": at, "delay_s": round(delay, 3)}
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
           "from_newest": after[0]["step"] == newest + 1 if after else newest == STEPS, "identical": same}
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
        refs = {}
        for ranks in (1, 2):
            code, log = run(command(ranks, root / f"ref{ranks}", ["--preset", "tiny", "--variant", "pixel_rf",
                                                                  "--steps", str(STEPS), *SETS]))
            assert code == 0, log[-2000:]
            refs[ranks] = step_losses(root / f"ref{ranks}")
        n_two = args.trials * 2 // 5
        plan = [(1, POINTS_ONE[i % len(POINTS_ONE)]) for i in range(args.trials - n_two)]
        plan += [(2, POINTS_TWO[i % len(POINTS_TWO)]) for i in range(n_two)]
        for ranks, point in plan:
            emit(trial(ranks, point, refs[ranks], root, rng))
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
