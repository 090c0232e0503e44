"""Learning curves on the shapes world: every checkpoint of a run, scored as the study scores a run.

    .venv/bin/python benchmarks/shapes_curves.py --runs pixel_rf=runs/prf_v2 pixel=runs/px_v2 \\
        --out docs/results/bench/shapes_curves.jsonl --oracle --plot docs/figures/shapes_curves.png

For each run and each of its checkpoints (step folders, oldest first), one JSON line: ShapesEval
on the first --per-category prompts of each category (--n images each, the paper's guidance:
pixel 3, rep 2, 25 Euler steps), held-out VQA by question kind and caption exact match, and with
--oracle the pixel stage alone (the prompts' rep tokens taken from ground-truth renders,
`study.evaluate.oracle_shapeseval`), and for rep models how much the renderer reads its rep tokens
(`study.evaluate.rep_reliance`: x-prediction error at t = 0.1 and 0.3 with another scene's ids
minus with its own). Lines already in --out are kept and not recomputed, so the
script resumes. A vlm run gets only the understanding scores. --plot draws ShapesEval overall
against training steps, one line per label of --out (or of --plot-labels; the oracle dashed).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from repforce import checkpoint
from repforce.engine import GenOptions, load
from repforce.study import evaluate
from repforce.worlds import shapeseval


def score(step_dir: Path, per_category: int, n: int, vqa_n: int, cap_n: int, oracle: bool, top_k: int) -> dict:
    eng = load(step_dir, precision="fp32")  # the same figures on every host (auto is bf16 on AMX/AVX512-BF16)
    row = {"variant": eng.cfg.variant}
    opts = GenOptions(rep_top_k=top_k)
    if eng.cfg.has_gen:
        with tempfile.TemporaryDirectory() as tmp:  # the study's batching and seeds; the PNGs are not kept
            images = evaluate.write_shapeseval(eng, tmp, n, opts, 0, per_category, progress=False)
        row["shapeseval"] = shapeseval.score_images(images, per_category).scores
        if oracle and eng.cfg.rep_ids:
            row["oracle"], _ = evaluate.oracle_shapeseval(eng, n, opts, 0, per_category)
        if eng.cfg.rep_ids:
            row["rep_reliance"] = evaluate.rep_reliance(eng, 64)
    if vqa_n:
        v = evaluate.vqa(eng, vqa_n)
        row["vqa"] = {"accuracy": v["accuracy"], "by_kind": v["by_kind"]}
    if cap_n:
        row["caption_exact"] = evaluate.captions(eng, cap_n)["exact_match"]
    return row


def plot(rows: list[dict], path: Path, labels: list[str] = ()) -> None:
    """labels: only these, in this order, each LABEL or LABEL=LEGEND NAME (default: every label in rows)."""
    import matplotlib  # heavy

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for spec in labels or dict.fromkeys(r["label"] for r in rows):
        label, _, name = spec.partition("=")
        name = name or label
        mine = sorted((r for r in rows if r["label"] == label and "shapeseval" in r), key=lambda r: r["step"])
        if not mine:
            continue
        line, = ax.plot([r["step"] for r in mine], [r["shapeseval"]["overall"] for r in mine], "o-", label=name)
        orc = [r for r in mine if "oracle" in r]
        if orc:
            ax.plot([r["step"] for r in orc], [r["oracle"]["overall"] for r in orc], "--", color=line.get_color(),
                    label=f"{name}, oracle rep tokens")
    ax.set_xlabel("training steps (batch 32)")
    ax.set_ylabel("ShapesEval overall")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", required=True, help="LABEL=RUN_FOLDER (or a bare folder: its name is the label)")
    ap.add_argument("--out", required=True, help="JSON lines, appended; resumes")
    ap.add_argument("--per-category", type=int, default=10)
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--vqa", type=int, default=200)
    ap.add_argument("--captions", type=int, default=50)
    ap.add_argument("--oracle", action="store_true")
    ap.add_argument("--top-k", type=int, default=0, help="rep-token top-k at sampling (0 = all, the engine default)")
    ap.add_argument("--steps", default="", help="only these steps, comma-separated (default: every checkpoint)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--plot", default="")
    ap.add_argument("--plot-labels", nargs="+", default=[],
                    help="plot only these labels of --out, in this order; LABEL=NAME renames one in the legend")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    rows = [json.loads(x) for x in out.read_text().splitlines() if x.strip() and not x.startswith("#")] if out.exists() else []
    if not out.exists():  # the first line names the command, as the report's benchmark section expects
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("# .venv/bin/python benchmarks/shapes_curves.py " + " ".join(map(shlex.quote, sys.argv[1:])) + "\n")
    done = {(r["label"], r["step"], r.get("top_k", 0)) for r in rows}
    only = {int(s) for s in args.steps.split(",") if s}
    for spec in args.runs:
        label, _, run = spec.rpartition("=")
        run = Path(run)
        label = label or run.name
        for d in checkpoint.step_dirs(run / "checkpoints"):
            step = int(d.name.split("_")[-1])
            if (label, step, args.top_k) in done or (only and step not in only):
                continue
            t0 = time.time()
            row = {"label": label, "run": str(run), "step": step, "top_k": args.top_k,
                   **score(d, args.per_category, args.n, args.vqa, args.captions, args.oracle, args.top_k)}
            row["wall_s"] = round(time.time() - t0, 1)
            print(json.dumps(row), flush=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
    if args.plot:
        plot(rows, Path(args.plot), args.plot_labels)


if __name__ == "__main__":
    main()
