"""What each change of recipe shapes-v3 buys the pixel stage, one arm at a time, at a short budget.

    .venv/bin/python benchmarks/pixel_stage_ablation.py --root runs/ablation \\
        --out docs/results/bench/pixel_stage_ablation.jsonl

Every arm trains pixel_rf (or pixel) from the shipped stage 1 (`shapes_vlm`) for --steps steps at
batch 32, constant learning rate after warmup, fp32, two threads, into ROOT/<arm>; an arm whose
final checkpoint is there is not retrained (the script resumes). Each is then scored as
benchmarks/shapes_curves.py scores a checkpoint (ShapesEval on 10 prompts per category x 2 at
the paper's guidance, the truth-rep-token oracle, 100 VQA questions) plus
`study.evaluate.rep_reliance`: the renderer's x-prediction error at t = 0.1 and 0.3 with another
scene's rep ids minus with the scene's own; 0 means the pixel stage ignores its rep tokens.
One JSON line per arm, the command on the first line. About 8 minutes an arm on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from shapes_curves import score  # noqa: E402

from repforce import checkpoint  # noqa: E402
from repforce.config import override, validate  # noqa: E402
from repforce.engine import load  # noqa: E402
from repforce.presets import preset  # noqa: E402
from repforce.study import evaluate  # noqa: E402
from repforce.train import train  # noqa: E402

KMEANS = ["model.rep_init=kmeans", "model.rep_momentum=1.0", "model.rep_balance=none", "model.rep_center_momentum=1.0"]
ARMS = {  # arm -> (preset, variant, overrides): shapes-v2, then v3's changes added one at a time
    "v2": ("shapes_v2", "pixel_rf", []),
    "v2+sincos": ("shapes_v2", "pixel_rf", ["model.pos_init=sincos"]),
    "v2+held_codebook": ("shapes_v2", "pixel_rf", ["model.rep_momentum=1.0", "model.rep_balance=none"]),
    "v2+kmeans": ("shapes_v2", "pixel_rf", KMEANS),
    "v2+kmeans+sincos": ("shapes_v2", "pixel_rf", KMEANS + ["model.pos_init=sincos"]),
    "v2+kmeans+sincos+rope2d": ("shapes_v2", "pixel_rf", KMEANS + ["model.pos_init=sincos", "model.image_rope=2d"]),
    "v3": ("shapes", "pixel_rf", []),  # the above + min-SNR (model.loss_t_eps=0.3)
    "pixel_v2+sincos": ("shapes_v2", "pixel", ["model.pos_init=sincos"]),  # no rep tokens at all
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, help="folder of the arms' run folders")
    ap.add_argument("--out", required=True, help="JSON lines, appended; resumes")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out, root = Path(args.out), Path(args.root)
    rows = [json.loads(x) for x in out.read_text().splitlines() if x.strip() and not x.startswith("#")] if out.exists() else []
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("# .venv/bin/python benchmarks/pixel_stage_ablation.py " + " ".join(map(shlex.quote, sys.argv[1:])) + "\n")
    done = {(r["arm"], r["step"]) for r in rows}
    for arm in args.arms:
        if (arm, args.steps) in done:
            continue
        name, variant, sets = ARMS[arm]
        run = root / arm
        cfg = validate(override(preset(name, variant), [
            f"train.init={checkpoint.resolve('shapes_vlm')}", f"train.steps={args.steps}", f"train.ckpt_every={args.steps}",
            "optim.schedule=constant", "train.precision=fp32", f"train.threads={args.threads}", *sets]))
        dirs = checkpoint.step_dirs(run / "checkpoints") if run.exists() else []
        if not dirs or int(dirs[-1].name.split("_")[-1]) < args.steps:
            train(cfg, run, resume=bool(dirs), progress=False)
            dirs = checkpoint.step_dirs(run / "checkpoints")
        t0 = time.time()
        row = {"arm": arm, "preset": name, "overrides": sets, "step": args.steps,
               **score(dirs[-1], 10, 2, 100, 0, True, 0)}
        if cfg.model.rep_ids:
            row["rep_reliance"] = evaluate.rep_reliance(load(dirs[-1]), 64)
        fm = [json.loads(x)["loss_fm"] for x in (run / "log.jsonl").read_text().splitlines() if '"loss_fm"' in x]
        row["loss_fm_last100"] = sum(fm[-10:]) / len(fm[-10:])  # log lines every 10 steps
        row["wall_s"] = round(time.time() - t0, 1)
        print(json.dumps(row), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
