"""Which sampling setting moves a Fashion-MNIST run's scores? Prints one JSON object per
(run, setting): class accuracy, Frechet distance and composites, as the study scores them.

    .venv/bin/python benchmarks/fashion_sampling.py --runs runs/study/fashion_full/pixel_rf_s0 \\
        --settings default rep_temperature=0.5 rep_cfg=4 cfg=1

On Fashion-MNIST at 2,000 steps `pixel_rf` draws fewer images of the prompted class than
`pixel` (docs/results/findings.md) while its L_Rep ends near 2.5 nats. If the rep tokens it
samples are what misleads the pixels, a cooler or more strongly guided token draw should win
class accuracy back; if the pixel guidance is, `cfg` should. A setting is `default` (the
study's `GenOptions`) or comma-separated `field=value` overrides of it. Everything else is
the study's evaluation (the same prompts, images per prompt, seed and batching), so `default`
reproduces the recorded scores exactly, from identical images (`digest`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time

from repforce.engine import GenOptions, load
from repforce.study.ablation import BUDGETS, PER_PAIR
from repforce.study.evaluate import fashion


def options(setting: str) -> GenOptions:
    """`default` or "field=value,field=value" over the study's GenOptions; unknown fields fail by name."""
    if setting == "default":
        return GenOptions()
    parse = {"int": int, "float": float, "float | None": float, "str": str}
    fields = {f.name: parse[str(f.type)] for f in dataclasses.fields(GenOptions) if str(f.type) in parse}
    kw = {}
    for item in setting.split(","):
        key, _, value = item.partition("=")
        try:
            kw[key] = fields[key](value)
        except (KeyError, ValueError):
            raise SystemExit(f"bad setting {item!r}: expected field=value with field one of {sorted(fields)}") from None
    return GenOptions(**kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", required=True, help="trained run folders")
    ap.add_argument("--settings", nargs="+", default=["default"], help="`default` or field=value[,field=value]")
    ap.add_argument("--budget", default="full", help="the study budget whose images per prompt to use")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    b = BUDGETS[args.budget]
    plans = [(s, options(s)) for s in args.settings]  # every setting checked before any sampling
    for run in args.runs:
        eng = load(run)
        for name, opts in plans:
            t0 = time.time()
            scores, arr, pairs = fashion(eng, b.n_fashion, opts, args.seed, vqa_n=0,
                                         n_pairs=b.n_pairs if b.fashion_pairs else 0, n_per_pair=PER_PAIR)
            h = hashlib.sha1(arr.tobytes() + (pairs.tobytes() if pairs is not None else b"")).hexdigest()[:16]
            p = scores.get("pairs", {})
            print(json.dumps({"run": run, "variant": eng.cfg.variant, "setting": name,
                              "class_accuracy": round(scores["class_accuracy"], 4),
                              "frechet_distance": round(scores["frechet_distance"], 3),
                              "pair_accuracy": p.get("pair_accuracy"), "item_accuracy": p.get("item_accuracy"),
                              "digest": h, "wall_s": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
