"""A picture of what a pixel model draws: fixed prompts x 4 seeds, and for rep models the oracle
(truth renders above, the pixel stage from their rep tokens below), at the paper's guidance.

    .venv/bin/python benchmarks/sample_grid.py runs/prf_v3 docs/figures/prf_v3_samples.png

Writes OUT (rows: the prompts below; columns: seeds) and OUT with _oracle before .png (the first 6
ShapesEval prompts per category x 2, each truth render above what the pixel stage drew from its
rep tokens), and prints the oracle's scores on them.
"""

import sys

import numpy as np
import torch
from PIL import Image

from repforce.engine import GenOptions, load
from repforce.study import evaluate
from repforce.worlds import shapes, shapeseval

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle", "a purple square",
           "an orange triangle", "a circle", "a square", "a red circle and a blue square", "two green triangles"]


def main(run: str, out: str, cfg: float = 3.0) -> None:
    torch.set_num_threads(2)
    eng = load(run)
    arr, _ = eng.generate_arrays(PROMPTS, 4, 123, GenOptions(cfg=cfg))
    g = np.concatenate([np.concatenate(list(arr[i * 4:(i + 1) * 4]), axis=1) for i in range(len(PROMPTS))], axis=0)
    Image.fromarray(g).resize((g.shape[1] * 3, g.shape[0] * 3), Image.NEAREST).save(out)
    if not eng.cfg.rep_ids:
        return
    scores, arr = evaluate.oracle_shapeseval(eng, 2, GenOptions(cfg=cfg), 0, 6)
    side = eng.cfg.image_size
    truth = [shapes.render(shapeseval.scene_for_prompt(p, shapeseval.truth_seed(p, k), side))
             for p in shapeseval.prompts(6) for k in range(2)]
    pairs = [np.concatenate([t, a], axis=0) for t, a in zip(truth, arr)]  # truth above, drawn below
    g = np.concatenate([np.concatenate(pairs[i:i + 12], axis=1) for i in range(0, len(pairs), 12)], axis=0)
    Image.fromarray(g).resize((g.shape[1] * 2, g.shape[0] * 2), Image.NEAREST).save(out.replace(".png", "_oracle.png"))
    print({k: round(v, 3) for k, v in scores.items()})


if __name__ == "__main__":
    main(*sys.argv[1:3], *map(float, sys.argv[3:4]))
