"""What a run's rep ids say about the image: entropies of ids against cell contents on held-out scenes.

    .venv/bin/python benchmarks/codebook_quality.py --runs v2=runs/ablation/v2 v3=runs/ablation/v3 \\
        --out docs/results/bench/codebook_quality.jsonl

For 512 held-out scenes, each rep cell (8 x 8 px at 32 px) is labelled by what covers it: "bg"
when objects cover under 4 of its pixels, else the color and shape of the object covering most
of it. Then, in bits: H(id | bg) over the empty cells (identical content: 0 for a codebook that
names emptiness once), H(content | id) (what an id leaves open about its cell; what the
renderer must guess) and H(id | content) (how many ids one content is spread over; what the
rep stage must guess). One JSON line per run, with the run's own quantizer.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from repforce.engine import load
from repforce.worlds import shapes


def labels(scene, canvas: int, cells: int) -> list[str]:
    lab = np.full((canvas, canvas), "bg", dtype=object)
    cov = np.zeros((canvas, canvas))
    for o in scene.objects:
        a = shapes.coverage(o.shape, o.cx, o.cy, shapes.box_side(o.size, canvas), canvas)
        lab[a > cov] = f"{o.color} {o.shape}"
        cov = np.maximum(cov, a)
    k, out = canvas // cells, []
    for i in range(cells):
        for j in range(cells):
            c, lb = cov[i * k:(i + 1) * k, j * k:(j + 1) * k], lab[i * k:(i + 1) * k, j * k:(j + 1) * k]
            if c.sum() < 4:
                out.append("bg")
            else:
                vals, counts = np.unique(lb[c > 0.5] if (c > 0.5).any() else lb[c > 0], return_counts=True)
                out.append(str(vals[counts.argmax()]))
    return out


def entropy(xs) -> float:
    c = collections.Counter(xs)
    n = sum(c.values())
    return -sum(v / n * math.log2(v / n) for v in c.values())


def conditional(a, b) -> float:  # H(a | b)
    groups = collections.defaultdict(list)
    for x, y in zip(a, b):
        groups[y].append(x)
    return sum(len(g) / len(a) * entropy(g) for g in groups.values())


def measure(run: str, n: int) -> dict:
    eng = load(run)
    c = eng.cfg
    cells = math.isqrt(c.n_rep)
    scenes = shapes.scenes("heldout", 0, n, c.image_size)
    content = [lab for sc in scenes for lab in labels(sc, c.image_size, cells)]
    ids = []
    with torch.no_grad():
        for s in range(0, n, 64):
            x = torch.stack([eng.image_tensor(shapes.render(sc)) for sc in scenes[s:s + 64]])
            ids.append(eng.model.rep_targets(x)[0].reshape(-1))
    ids = [int(i) for i in torch.cat(ids)]
    bg = [i for i, lab in zip(ids, content) if lab == "bg"]
    return {"cells": len(ids), "bg_share": len(bg) / len(ids), "ids_used": len(set(ids)), "ids_on_bg": len(set(bg)),
            "H_id_given_bg": entropy(bg), "H_content": entropy(content), "H_content_given_id": conditional(content, ids),
            "H_id_given_content": conditional(ids, content), "H_id": entropy(ids)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", required=True, help="LABEL=RUN_FOLDER")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        f.write("# .venv/bin/python benchmarks/codebook_quality.py " + " ".join(map(shlex.quote, sys.argv[1:])) + "\n")
        for spec in args.runs:
            label, _, run = spec.rpartition("=")
            row = {"label": label, "run": run, **{k: round(v, 3) if isinstance(v, float) else v
                                                  for k, v in measure(run, args.n).items()}}
            print(json.dumps(row), flush=True)
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
