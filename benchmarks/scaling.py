"""How the cost of a `pixel_rf` training step grows with the work: image size (32, 64, 128 px at a
fixed patch, so 4x the tokens per doubling) and model size (presets and wider models).
Prints one JSON object per line: step time, tokens per step, tokens/s, FLOPs per step, achieved
FLOP/s and the peak resident memory of a fresh process for that one configuration.

    .venv/bin/python benchmarks/scaling.py                     # both sweeps, fp32, batch 8
    .venv/bin/python benchmarks/scaling.py --sizes 32 64 --models tiny shapes

Each configuration runs in its own child process, so peak memory (ru_maxrss) is its own. The
worlds render at 32 px; larger sizes upsample the rendered canvas (nearest), which costs the
same as a native render of that size. Nothing else may run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import matmul_peak, model_flops  # noqa: E402

from repforce import config as C  # noqa: E402
from repforce.data import WorldStream as ShapesStream  # noqa: E402
from repforce.data import build_world_tokenizer  # noqa: E402
from repforce.model import RFModel  # noqa: E402
from repforce.runtime import autocast  # noqa: E402
from repforce.sequence import Layout  # noqa: E402
from repforce.study.ablation import BUDGETS  # noqa: E402
from repforce.trainable import param_groups  # noqa: E402

# model sizes beyond the presets: the shapes preset widened and deepened
MODELS = {
    "tiny": ("tiny", []),
    "quick": ("shapes", list(BUDGETS["quick"].overrides)),  # the quick study's model
    "shapes": ("shapes", []),
    "shapes_x2": ("shapes", ["model.dim=384", "model.n_layers=8", "model.ffn_hidden=1024", "model.n_heads=6",
                             "model.n_kv_heads=2"]),
}


def one(model_name: str, size: int, batch: int, steps: int, warmup: int) -> dict:
    preset, sets = MODELS[model_name]
    with tempfile.TemporaryDirectory() as d:
        tok = build_world_tokenizer(d)
    cfg = C.override(preset(preset, "pixel_rf"), sets + [f"model.vocab_size={len(tok)}", "train.precision=fp32"])
    m = replace(cfg.model, image_size=size, gen_size=size)  # same patches: (size / 4)^2 pixel tokens
    stream = ShapesStream(cfg.data, tok, Layout.for_model(m))  # renders 32 px, slots for `size`
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(0)
    model = RFModel(m)
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=1e-4, betas=(0.9, 0.95))
    times, toks, flops = [], 0, 0.0
    for i in range(warmup + steps):
        b = stream.batch(i, batch)
        for k in ("images", "gen_x"):
            b[k] = F.interpolate(b[k], size=(size, size), mode="nearest")
        t0 = time.perf_counter()
        with autocast("fp32", torch.device("cpu")):
            loss = model(b)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.update_ema_encoder()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            toks += int((b["kind"] != 0).sum())
            flops += model_flops(model, b)
    wall = sum(times)
    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("ema_encoder."))
    return {"what": "scaling", "model": model_name, "image_size": size, "batch": batch, "params": params,
            "seq_len": int(b["kind"].shape[1]), "step_s": wall / steps, "tokens_per_step": toks / steps,
            "tokens_per_s": toks / wall, "flops_per_step": flops / steps, "flops_per_s": flops / wall,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "model_rss_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--one", nargs=2, metavar=("MODEL", "SIZE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.batch, args.steps, args.warmup)), flush=True)
        return
    print(json.dumps({"what": "matmul_peak", "fp32_flops": matmul_peak(torch.float32),
                      "threads": torch.get_num_threads()}), flush=True)
    runs = [("shapes", s) for s in args.sizes] + [(m, 32) for m in args.models if m != "shapes" or 32 not in args.sizes]
    for model_name, size in runs:
        cmd = [sys.executable, __file__, "--one", model_name, str(size), "--batch", str(args.batch),
               "--steps", str(args.steps), "--warmup", str(args.warmup)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(json.dumps({"what": "scaling", "model": model_name, "image_size": size,
                              "error": r.stderr.strip().splitlines()[-1:]}), flush=True)
            continue
        print(r.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
