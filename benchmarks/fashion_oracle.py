"""Do a pixel_rf run's pixels follow its rep tokens or its text? Prints one JSON object per
(run, condition): how often the judge sees the prompted class, and the tokens' class.

    .venv/bin/python benchmarks/fashion_oracle.py --runs runs/study/fashion_full/pixel_rf_s0

A pixel_cont run is probed the same way with its continuous rep features in place of tokens
("real features"; its probe reads those features).

The run's own rep tokens are replaced by those of real test images (its EMA encoder and
quantizer, as in training), and only the pixel stage samples, at the study's settings:

- `real tokens, same class`: tokens of an image of the prompted class. If class accuracy is
  high here and low in the study, the sampled tokens are what goes wrong (the first stage);
  if it is low here too, the pixel stage cannot turn even right tokens into the class.
- `real tokens, next class`: tokens of an image of class k+1 under the prompt of class k.
  The judge's vote between text and tokens says which the pixels follow.
- `real tokens, shuffled`: tokens of the right class with their cells permuted within the
  image: how much of the guidance is in the grid's layout rather than in which ids it holds.

First, a `token probe`: a linear classifier on the one-hot rep ids of 5,000 training images,
scored on 2,000 test images: how much of the class the tokens hold at all. The same
classifier on the features the quantizer is given (`feature_probe_accuracy`: pooled, before
the ids) says what quantizing loses, and on the raw pixels (`pixel_probe_accuracy`) is the yardstick.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from repforce.engine import GenOptions, load, to_uint8
from repforce.quantizer import pool2x2
from repforce.study.ablation import BUDGETS
from repforce.vae import decode
from repforce.worlds import fashion as fm


def pixels(eng, prompts: list[str], ids: torch.Tensor, seed: int, bs: int = 100) -> np.ndarray:
    """uint8 images (B, H, W, 3) from the pixel stage alone, guided by the given rep ids (or features)."""
    gen = torch.Generator(eng.device).manual_seed(seed)
    out = []
    with torch.no_grad(), eng._autocast():
        for s in range(0, len(prompts), bs):
            x = eng.sample_pixels(prompts[s:s + bs], ids[s:s + bs].to(eng.device), GenOptions(), gen)
            if eng.cfg.variant.startswith("vae"):
                x = decode(eng.vae, x)
            out.append(to_uint8(x))
    return np.concatenate(out)


def batched(eng, images: np.ndarray, fn, bs: int = 100) -> torch.Tensor:
    """fn over uint8 canvases (B, H, W, 3) as [-1, 1] tensors, bs at a time, concatenated on the CPU."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    with torch.no_grad():
        return torch.cat([fn(x[s:s + bs].to(eng.device)).cpu() for s in range(0, len(x), bs)])


def rep_ids(eng, images: np.ndarray) -> torch.Tensor:
    """Rep ids (B, M), from the run's EMA encoder and quantizer."""
    return batched(eng, images, lambda x: eng.model.rep_targets(x)[0])


def rep_features(eng, images: np.ndarray) -> torch.Tensor:
    """What the quantizer is given: the pooled target features, flattened to (B, M * De)."""
    m = eng.model
    return batched(eng, images, lambda x: pool2x2(m.target_features(x), m.cfg.rep_pool).flatten(1)).float()


def real_reps(eng, images: np.ndarray) -> torch.Tensor:
    """What guides the pixels, from real images: rep ids (B, M), or pixel_cont's features (B, M, De)."""
    return rep_ids(eng, images) if eng.cfg.rep_ids else batched(eng, images, eng.model.cont_targets)


def onehot(ids: torch.Tensor, codes: int) -> torch.Tensor:
    """(B, M) ids -> (B, M * codes): each cell its own block."""
    return torch.nn.functional.one_hot(ids, codes).flatten(1).float()


def probe(xtr: torch.Tensor, train_y, xte: torch.Tensor, test_y, steps: int = 300) -> float:
    """Test accuracy of a linear classifier (full-batch Adam) on features (B, F), centered and put on one scale
    by the train set's (one scale for all: per-feature scaling would blow up rare ids and edge pixels)."""
    mu, sd = xtr.mean(0), xtr.std()
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    ytr = torch.tensor(train_y, dtype=torch.long)  # a copy: the IDX labels are a read-only map
    torch.manual_seed(0)
    lin = torch.nn.Linear(xtr.shape[1], len(fm.CLASSES))
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(xtr), ytr).backward()
        opt.step()
    with torch.no_grad():
        return float((lin(xte).argmax(1).numpy() == test_y).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", required=True, help="trained pixel_rf, vae_rf or pixel_cont run folders")
    ap.add_argument("--budget", default="full", help="the study budget whose images per class to use")
    ap.add_argument("--root", default=str(fm.DEFAULT_ROOT))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n = BUDGETS[args.budget].n_fashion
    x_tr, y_tr = fm.load_split("train", args.root)
    x_te, y_te = fm.load_split("test", args.root)
    # the first n test images of each class; the Frechet distance's real set is the last 2,000
    idx = np.concatenate([np.flatnonzero(y_te == k)[:n] for k in range(len(fm.CLASSES))])
    labels = y_te[idx]
    judge, _ = fm.load_judge()
    for run in args.runs:
        eng = load(run)
        if not eng.cfg.rep_slots:
            raise SystemExit(f"{run} is a {eng.cfg.variant} run: it has no rep tokens to replace")
        what = "real tokens" if eng.cfg.rep_ids else "real features"
        size = eng.cfg.image_size
        t0 = time.time()
        tr, te = np.stack([fm.to_canvas(im, size) for im in x_tr[:5000]]), np.stack(
            [fm.to_canvas(im, size) for im in x_te[-2000:]])
        # what the pixels are given, as probe input: one-hot ids, or pixel_cont's features
        given = (lambda im: onehot(rep_ids(eng, im), eng.cfg.codebook_size)) if eng.cfg.rep_ids else (
            lambda im: real_reps(eng, im).flatten(1))
        acc = probe(given(tr), y_tr[:5000], given(te), y_te[-2000:])
        feat = probe(rep_features(eng, tr), y_tr[:5000], rep_features(eng, te), y_te[-2000:])
        raw = probe(torch.tensor(x_tr[:5000].reshape(5000, -1)).float() / 255, y_tr[:5000],
                    torch.tensor(x_te[-2000:].reshape(2000, -1)).float() / 255, y_te[-2000:])
        print(json.dumps({"run": run, "condition": "token probe" if eng.cfg.rep_ids else "feature probe", "train": 5000, "test": 2000,
                          "test_accuracy": round(acc, 4), "feature_probe_accuracy": round(feat, 4),
                          "pixel_probe_accuracy": round(raw, 4),
                          "wall_s": round(time.time() - t0, 1)}), flush=True)
        reps = real_reps(eng, np.stack([fm.to_canvas(x_te[i], size) for i in idx]))
        g = torch.Generator().manual_seed(args.seed)
        shuffled = torch.stack([row[torch.randperm(row.shape[0], generator=g)] for row in reps])  # cells permuted
        nxt = (np.arange(len(idx)) + n) % len(idx)  # rows are class-major: n rows on is the next class
        conditions = [(f"{what}, same class", reps, labels),
                      (f"{what}, next class", reps[nxt], labels[nxt]),
                      (f"{what}, shuffled", shuffled, labels)]
        for name, rep, token_class in conditions:
            t0 = time.time()
            images = pixels(eng, [fm.caption(int(k)) for k in labels], rep, args.seed)
            pred, _ = fm.predict(judge, images)
            print(json.dumps({"run": run, "condition": name, "n": int(len(images)),
                              "judged_prompted_class": round(float((pred == labels).mean()), 4),
                              "judged_token_class": round(float((pred == token_class).mean()), 4),
                              "wall_s": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
