"""Sampling speed: images/s at 25 ODE steps with and without the cached prefix, and rep-token
decoding with and without the KV cache, as ratios measured in one process, runs alternated.

    .venv/bin/python benchmarks/sampling.py                       # shapes preset, random weights
    .venv/bin/python benchmarks/sampling.py --ckpt runs/pixel_rf  # a trained run

Speed does not depend on the weights, so a fresh model of the preset is as good as a
trained one. "uncached" recomputes the whole sequence (prompt, rep tokens, pixel block) at
every ODE step and every rep step, which is what a sampler without a KV cache does.
Prints one JSON object per line. Run nothing else meanwhile.

The pixel-stage saving is bounded by the geometry: a cached ODE step runs the n_gen pixel
tokens, an uncached one the prefix too, so the ratio is about (prefix + n_gen) / n_gen plus
attention. `--prompt-repeat R` repeats the prompt R times (a longer prompt, as in real
captions) to show how the saving grows with the prefix:

    .venv/bin/python benchmarks/sampling.py --batches 64 --prompt-repeat 1 4 8
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from repforce import config as C
from repforce.data import build_world_tokenizer
from repforce.engine import Engine, GenOptions, load
from repforce.model import RFModel
from repforce.presets import preset

PROMPT = "two small red circles and a large blue square"


def timed(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt")
    p.add_argument("--preset", default="shapes")
    p.add_argument("--variant", default="pixel_rf")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--prompt-repeat", type=int, nargs="+", default=[1], help="prompt lengths, as repeats of it")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ckpt:
        eng = load(args.ckpt)
    else:
        with tempfile.TemporaryDirectory() as d:
            tok = build_world_tokenizer(d)
        cfg = C.override(preset(args.preset, args.variant), [f"model.vocab_size={len(tok)}"])
        torch.manual_seed(0)
        eng = Engine(RFModel(cfg.model), tok)
    for repeat in args.prompt_repeat:
        run(eng, args, " and ".join([PROMPT] * repeat))


def run(eng, args, prompt: str) -> None:
    c = eng.cfg
    meta = {"preset": args.preset, "variant": c.variant, "threads": torch.get_num_threads(), "ode_steps": args.steps,
            "prompt_tokens": len(eng.tok.encode(prompt)),
            "prefix_tokens": len(eng.tok.encode(prompt)) + 2 + (c.n_rep if c.rep_slots else 0), "gen_tokens": c.n_gen}
    for B in args.batches:
        prompts = [prompt] * B
        res = {}
        for name, cache in (("cached", True), ("uncached", False), ("cached", True), ("uncached", False)):
            o = GenOptions(steps=args.steps, use_cache=cache)
            t = timed(lambda: eng.generate_arrays(prompts, 1, 0, o, batch_size=B), 1)
            res[name] = min(res.get(name, float("inf")), t)
        print(json.dumps({"what": "generate", "batch": B, **meta, "cached_images_per_s": B / res["cached"],
                          "uncached_images_per_s": B / res["uncached"], "speedup": res["uncached"] / res["cached"]}),
              flush=True)
        if c.rep_slots:
            gen = torch.Generator().manual_seed(0)
            res = {}
            for name, cache in (("cached", True), ("uncached", False)) * 2:
                o = GenOptions(use_cache=cache, rep_temperature=0.0)
                with torch.no_grad(), eng._autocast():
                    t = timed(lambda: eng.sample_reps(prompts, o, gen), args.reps)
                res[name] = min(res.get(name, float("inf")), t)
            print(json.dumps({"what": "rep_decode", "batch": B, **meta, "cached_s": res["cached"],
                              "uncached_s": res["uncached"], "speedup": res["uncached"] / res["cached"]}), flush=True)


if __name__ == "__main__":
    main()
