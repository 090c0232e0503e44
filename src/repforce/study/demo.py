"""The main job: train pixel_rf on the shapes world in bounded time and write report.html.

    repforce demo --minutes 10 --out runs/demo

Protocol of docs/DESIGN.md: a short `vlm` stage (understanding only), then `pixel_rf` from
it, on a fresh machine with nothing downloaded. Training stops on wall time (constant
learning rate after warmup, EMA with warmup, so any stopping point is a usable model).
Then the EMA model draws a ShapesEval subset (the first `per_category` prompts of each
category, two images each) that the exact judge scores, answers held-out VQA questions,
and everything lands in one self-contained report.html beside the PNGs.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

from ..config import override, validate
from ..engine import GenOptions, load
from ..presets import preset as make_preset
from ..train import RunError, train
from ..worlds import shapeseval
from . import evaluate
from .report import prototype_colors, rep_map, write_report

SPLIT = {"vlm": 0.22, "pixel_rf": 0.72}  # shares of the budget; the rest is evaluation and the report


def demo(out: str | Path = "runs/demo", minutes: float = 10.0, preset: str = "shapes", seed: int = 0,
         per_category: int = 10, n: int = 2, vqa_n: int = 200, progress: bool = True, overrides: list[str] = ()) -> dict:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise RunError(f"{out} already exists and is not empty; choose another --out (nothing was touched)")
    if minutes <= 0:
        raise RunError(f"--minutes={minutes}: must be > 0")
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    common = ["optim.schedule=constant", "train.steps=1000000", "train.ckpt_every=1000000", f"train.seed={seed}",
              f"data.seed={seed}", *overrides]
    walls = {}
    vlm_cfg = validate(override(make_preset(preset, "vlm"), common))
    s = train(vlm_cfg, out / "vlm", progress=progress, minutes=minutes * SPLIT["vlm"])
    walls["vlm"] = s["wall_s"]
    rf_cfg = validate(override(make_preset(preset, "pixel_rf"), common + [f"train.init={out / 'vlm'}"]))
    s_rf = train(rf_cfg, out / "pixel_rf", progress=progress, minutes=minutes * SPLIT["pixel_rf"])
    walls["pixel_rf"] = s_rf["wall_s"]

    t_eval = time.time()
    eng = load(out / "pixel_rf")
    opts = GenOptions()
    images = evaluate.write_shapeseval(eng, out / "shapeseval", n, opts, seed, per_category, progress=progress)
    scored = shapeseval.score_images(images, per_category)
    (out / "shapeseval" / "results.json").write_text(json.dumps(scored.to_json(), indent=1))
    vqa = evaluate.vqa(eng, vqa_n)
    cap = evaluate.captions(eng, 50)

    # the gallery: the first three prompts of every category, one image each, with its rep map
    colors = prototype_colors(eng)
    plist = shapeseval.prompts(3)
    arr, reps = eng.generate_arrays([p.text for p in plist], 1, seed + 999, opts)
    judged = shapeseval.score_images({(p.index, 0): a for p, a in zip(plist, arr)}, 3)
    gallery = [{"prompt": p.text, "image": a, "rep": rep_map(r, colors, eng.cfg.image_size),
                "correct": row["correct"], "reason": row["reason"]}
               for p, a, r, row in zip(plist, arr, reps, judged.images)]
    walls["evaluation"] = time.time() - t_eval

    command = "repforce " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[0].endswith("repforce") else \
        f"repforce demo --minutes {minutes} --out {out}"
    notes = [f"pixel_rf trained {s_rf['step']} steps after a {s['step']}-step vlm stage; "
             f"wall time: vlm {walls['vlm']:.0f}s, pixel_rf {walls['pixel_rf']:.0f}s, evaluation {walls['evaluation']:.0f}s.",
             f"ShapesEval subset: first {per_category} prompts per category x {n} images, judged exactly; "
             f"VQA: {vqa_n} held-out questions."]
    report = write_report(out / "report.html", "repforce demo: Representation Forcing on the shapes world",
                          {"vlm": out / "vlm", "pixel_rf": out / "pixel_rf"}, scored.scores, vqa, gallery, command,
                          {"vlm": vlm_cfg.to_json(), "pixel_rf": rf_cfg.to_json()}, notes, cap)
    summary = {"report": str(report), "wall_s": time.time() - t0, "walls": walls, "steps": {"vlm": s["step"],
               "pixel_rf": s_rf["step"]}, "shapeseval": scored.scores, "vqa": vqa["accuracy"],
               "vqa_by_kind": vqa["by_kind"], "caption_exact_match": cap["exact_match"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
