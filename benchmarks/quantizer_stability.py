"""How stable and how broad the representation targets are, per quantizer setting, on the
frozen encoder of a trained vlm run. Prints one JSON object per (setting, checkpoint step).

    .venv/bin/python benchmarks/quantizer_stability.py --vlm runs/vlm
    .venv/bin/python benchmarks/quantizer_stability.py --vlm runs/pixel_rf --stream gen --settings shapes_preset

The quantizer runs alone (no training of the model) for `--steps` batches of the train stream,
as it would in the joint stage if the encoder stood still. `--vlm` may also name a trained
pixel_rf run: its own EMA encoder and feature center are used, and its trained quantizer is
scored on the probe set first (setting "trained"), so a fresh quantizer on the same frozen
features tells whether narrow codebook use comes from the features or from the training.
`--stream gen` feeds the generation images of the training stream (16 per batch, half of
them ShapesEval-style prompt scenes) instead of plain scenes (32 per batch). Every 50 batches a fixed probe set of
64 held-out images is quantized in eval mode and we record:
  used / ppl   ids in use on the probe set and the perplexity of their histogram (of K),
  h_pos        mean over rep positions of the entropy (nats) of the id at that position: what a
               predictor that knows only the position pays,
  drift        share of probe ids that changed over the last 50 batches (a moving target),
  batch_dep    share of the ids of 32 probe images that change when they share the batch with 32
               other images (targets that depend on the batch companions).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from repforce import checkpoint
from repforce import config as C
from repforce.config import DataConfig
from repforce.data import sample_at
from repforce.model import RFModel
from repforce.presets import preset
from repforce.quantizer import OnlineQuantizer, perplexity, pool2x2
from repforce.train import init_weights_from
from repforce.worlds import shapes as world

SETTINGS = {  # name: OnlineQuantizer keyword arguments over the defaults below
    "printed": dict(),  # the paper's printed step on the batch, random init, re-seed after 20 idle updates
    "running": dict(stats="running"),
    "running_noreseed": dict(stats="running", dead_after=0),
    "sinkhorn_running": dict(balance="sinkhorn", stats="running", dead_after=0),
    "no_balance": dict(balance="none", dead_after=0),
    "data_init_running_m0.999": dict(init="data", stats="running", dead_after=0, momentum=0.999),  # shapes preset
    "shapes_preset": dict(init="data", stats="running", dead_after=0, momentum=0.999),  # the same, by its name
    "data_init_running_m0.99": dict(init="data", stats="running", dead_after=0),
    # the preset with SwAV's sharper assignment temperature (its epsilon is 0.05): balancing that bites
    "preset_sinkhorn_T0.05": dict(init="data", stats="running", dead_after=0, momentum=0.999, balance="sinkhorn",
                                  temperature=0.05),
    "preset_sinkhorn_T0.1": dict(init="data", stats="running", dead_after=0, momentum=0.999, balance="sinkhorn",
                                 temperature=0.1),
    "preset_sinkhorn": dict(init="data", stats="running", dead_after=0, momentum=0.999, balance="sinkhorn"),
    "preset_softmax_T0.05": dict(init="data", stats="running", dead_after=0, momentum=0.999, temperature=0.05),
}
BASE = dict(temperature=0.5, momentum=0.99, dead_after=20)


def images(split: str, start: int, n: int) -> torch.Tensor:
    arr = np.stack([world.render(s) for s in world.scenes(split, start, n)])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1


def gen_images(start: int, n: int) -> torch.Tensor:
    """Generation images of a run's training stream (data seed 0), as the joint stage quantizes them."""
    arr = np.stack([sample_at(DataConfig(), start + i, gen_fraction=1.0).image for i in range(n)])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1


def probe_stats(ids: torch.Tensor, codes: int) -> dict:
    counts = torch.bincount(ids.flatten(), minlength=codes)
    h_pos = np.mean([float(perplexity(torch.bincount(ids[:, j], minlength=codes)).log()) for j in range(ids.shape[1])])
    return {"used": int((counts > 0).sum()), "ppl": float(perplexity(counts)), "h_pos": h_pos}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--vlm", default="runs/vlm", help="a vlm run of the shapes preset")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--codes", type=int, default=256)
    p.add_argument("--stream", choices=("world", "gen"), default="world",
                   help="world: plain train scenes, 32 per batch; gen: the training stream's generation images, 16")
    args = p.parse_args()
    torch.manual_seed(0)
    run_cfg = json.loads((Path(args.vlm) / "config.json").read_text())
    trained = run_cfg["model"]["variant"] == "pixel_rf"
    cfg = preset("shapes", "pixel_rf")
    model = RFModel(C.Config.from_json(run_cfg).model if trained else cfg.model)
    if trained:  # the run's own EMA encoder, feature center and quantizer, as they ended
        state, _ = checkpoint.read(checkpoint.find(Path(args.vlm)))
        model.load_state_dict(state["model"])
    else:
        init_weights_from(model, args.vlm)
    model.eval()
    cache: dict = {}

    def feats(split, start, n):  # centered, pooled EMA-encoder features (the center moves as in training)
        if (split, start, n) not in cache:
            model.feat_center.train()
            x = gen_images(start, n) if split == "gen" else images(split, start, n)
            cache[(split, start, n)] = pool2x2(model.target_features(x), cfg.model.rep_pool)
        return cache[(split, start, n)]

    probe_img = images("heldout", 0, 64)
    if trained:
        with torch.no_grad():
            ids = model.rep_targets(probe_img)[0]
        print(json.dumps({"what": "quantizer_stability", "setting": "trained", "run": args.vlm,
                          **probe_stats(ids, model.cfg.codebook_size)}), flush=True)
    model.feat_center.train()
    with torch.no_grad():
        probe = pool2x2(model.target_features(probe_img), cfg.model.rep_pool)
    split, per = ("gen", 16) if args.stream == "gen" else ("train", 32)
    for name in args.settings:
        kw = {**BASE, **SETTINGS[name]}
        torch.manual_seed(0)
        q = OnlineQuantizer(args.codes, probe.shape[-1], **kw)
        prev = None
        for step in range(args.steps):
            q.train()
            q(feats(split, step * per, per))
            if (step + 1) % 50:
                continue
            q.eval()
            ids = q(probe)[0]  # (64, M)
            mixed = q(torch.cat([probe[:32], feats("train", 10**6, 32)]))[0][:32]
            print(json.dumps({"what": "quantizer_stability", "setting": name, "step": step + 1, "stream": args.stream,
                              "run": args.vlm, **probe_stats(ids, args.codes),
                              "drift": None if prev is None else float((ids != prev).float().mean()),
                              "batch_dep": float((ids[:32] != mixed).float().mean()), "K": args.codes, **kw}),
                  flush=True)
            prev = ids


if __name__ == "__main__":
    main()
