"""Does the pixel guidance weight change the ranking of the study's variants? Prints one
JSON object per (run, weight): ShapesEval overall and per category.

    .venv/bin/python benchmarks/guidance_sweep.py --runs runs/study/full/pixel_s0 runs/study/full/pixel_rf_s0 --cfg 1 3
    .venv/bin/python benchmarks/guidance_sweep.py --runs runs/dx/B/checkpoints/step_00000560 --cfg 1 3 --rep-cfg 1 2 \
        --n 2 --out docs/results/bench/demo_guidance.jsonl      # every (cfg, rep-cfg) pair
    .venv/bin/python benchmarks/guidance_sweep.py --runs RUN --cfg 3 --per-category 10 --n 2 \
        --samplers "" steps=2 shift=3 rep_top_k=8 steps=50,solver=heun   # other sampler settings, same images

The study samples every variant at the paper's weight (3.0). On `pixel` that empties
one-object canvases (docs/results/findings.md), so the study's absolute scores sit below
what this world allows; if guidance hurt some variants more than others, it would also bias
the comparison. Everything but `cfg` is the study's evaluation: the same prompts, images
per prompt, seed and batching (`evaluate.write_shapeseval`), so the row at 3.0 reproduces
the run's recorded score exactly, from identical images (`digest`).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import shlex
import sys
import tempfile
import time

from repforce.engine import GenOptions, load
from repforce.study.evaluate import write_shapeseval
from repforce.worlds import shapeseval


def digest(images: dict) -> str:
    """sha1 of the images in (prompt, k) order: equal digests mean identical samples."""
    h = hashlib.sha1()
    for key in sorted(images):
        h.update(images[key].tobytes())
    return h.hexdigest()[:16]


SAMPLER_FIELDS = {"steps": int, "solver": str, "shift": float, "rep_temperature": float, "rep_top_k": int}


def sampler(spec: str) -> dict:
    """"steps=50,solver=heun" -> {"steps": 50, "solver": "heun"}; "" -> {}. Exits naming a field it does not know."""
    out = {}
    for part in filter(None, spec.split(",")):
        key, _, value = part.partition("=")
        if key not in SAMPLER_FIELDS or not value:
            sys.exit(f"guidance_sweep: --samplers {spec!r}: expected KEY=VALUE with KEY one of {', '.join(SAMPLER_FIELDS)}")
        out[key] = SAMPLER_FIELDS[key](value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", required=True, help="trained run folders")
    ap.add_argument("--cfg", nargs="+", type=float, default=[1.0, 3.0], help="pixel guidance weights")
    ap.add_argument("--per-category", type=int, default=20, help="ShapesEval prompts per category (the study: 20)")
    ap.add_argument("--n", type=int, default=4, help="images per prompt (the study: 4)")
    ap.add_argument("--rep-cfg", dest="rep_cfg", nargs="+", type=float, default=[2.0],
                    help="rep-token guidance weights (the paper's: 2); every pair with --cfg is run")
    ap.add_argument("--samplers", nargs="+", default=[""],
                    help="further GenOptions fields, KEY=VALUE[,KEY=VALUE] per setting (\"\" = the defaults), each run "
                         "at every weight pair: steps, solver, shift, rep_temperature, rep_top_k")
    ap.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="also append the rows to this JSON-lines file (the command first)")
    args = ap.parse_args()
    if args.out:
        with open(args.out, "a") as f:
            f.write("# .venv/bin/python " + " ".join(shlex.quote(a) for a in sys.argv) + "\n")
    samplers = [sampler(spec) for spec in args.samplers]
    for run in args.runs:
        eng = load(run, ema=not args.raw)
        for w, r, extra in itertools.product(args.cfg, args.rep_cfg, samplers):
            t0 = time.time()
            with tempfile.TemporaryDirectory() as tmp:
                images = write_shapeseval(eng, tmp, args.n, GenOptions(cfg=w, rep_cfg=r, **extra), args.seed,
                                          args.per_category, progress=False)
            scores = shapeseval.score_images(images, args.per_category).scores
            row = json.dumps({"run": run, "variant": eng.cfg.variant, "cfg": w, "rep_cfg": r, **extra,
                              **({"weights": "raw"} if args.raw else {}), "images": len(images),
                              "digest": digest(images), **{k: round(v, 4) for k, v in scores.items()},
                              "wall_s": round(time.time() - t0, 1)})
            print(row, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(row + "\n")


if __name__ == "__main__":
    main()
