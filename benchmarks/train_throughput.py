"""Training throughput of a preset per variant: tokens/s, step time and MFU against a matmul
peak measured in the same process. Prints one JSON object per line.

    .venv/bin/python benchmarks/train_throughput.py --preset shapes --steps 30
    .venv/bin/python benchmarks/train_throughput.py --variants pixel_rf dense --steps 30
    .venv/bin/python benchmarks/train_throughput.py --variants pixel_rf --pack 0 320 --steps 20   # packed rows
    .venv/bin/python benchmarks/train_throughput.py --variants pixel_rf --pack 320 --arms joint= \
        gen_only=train.train_only=generation,data.gen_fraction=1.0             # the demo's pixel stage from a stage 1

`dense` is the reference: the same backbone width and depth as a plain decoder (one FFN,
no encoder, no images) on text-only sequences of the same length, i.e. what a plain
language model of this size costs here. Run nothing else meanwhile: with two cores a
second busy process halves every number.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace

import torch

from repforce import config as C
from repforce.data import WorldStream as ShapesStream
from repforce.data import build_world_tokenizer
from repforce.model import RFModel
from repforce.packing import pack_batch
from repforce.presets import preset
from repforce.runtime import autocast
from repforce.sequence import GEN, REP, Layout
from repforce.trainable import param_groups, set_trainable


def matmul_peak(dtype: torch.dtype, n: int = 1024, reps: int = 20) -> float:
    """Achieved FLOP/s of a square matmul in this process (best of a few)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def model_flops(model: RFModel, batch: dict) -> float:
    """Matmul FLOPs of one training step (forward + backward = 3x forward), counted analytically:
    backbone linears per token with one FFN expert active, attention scores and values,
    the encoder on understanding images, the EMA encoder forward on generation images,
    and the heads at the positions that use them."""
    c = model.cfg
    kind = batch["kind"]
    n_tok = int((kind != 0).sum())
    L = kind.shape[1]
    attn_lin = c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)
    ffn = 3 * c.dim * c.ffn_hidden
    per_tok = c.n_layers * (attn_lin + ffn)
    attn_scores = c.n_layers * 2 * L * c.n_heads * c.head_dim  # QK^T and AV, per query token (padded length)
    fwd = 2 * n_tok * per_tok + 2 * n_tok * attn_scores
    enc_params = sum(p.numel() for n, p in model.encoder.named_parameters() if p.ndim == 2)
    n_und = int((~batch["is_gen"]).sum())
    n_gen = int(batch["is_gen"].sum())
    fwd += 2 * n_und * c.n_enc * enc_params
    fwd += 2 * int((batch["text_targets"] != -100).sum()) * c.dim * c.vocab_size
    fwd += 2 * int((kind == GEN).sum()) * c.dim * c.patch_values * 2  # gen embed + head
    if c.rep_ids:
        fwd += 2 * int((kind == REP).sum()) * c.dim * c.codebook_size
    total = 3 * fwd
    if c.needs_ema_encoder:
        total += 2 * n_gen * c.n_enc * enc_params  # no backward through the EMA encoder
    return float(total)


def bench(cfg: C.Config, tok, steps: int, warmup: int, dense: bool = False, pack: int = 0) -> dict:
    """pack > 0: each batch packed into rows of `pack` positions (train.tokens_per_rank), the same samples."""
    torch.manual_seed(0)
    if dense:  # plain decoder reference: text-only sequences of the same padded length
        cfg = replace(cfg, model=replace(cfg.model, variant="vlm"))
    model = RFModel(cfg.model)
    set_trainable(model, cfg.train)  # train.train_only / train.freeze of --set
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=1e-4, betas=(0.9, 0.95))
    stream = ShapesStream(cfg.data, tok, Layout.for_model(cfg.model))
    batches = [stream.batch(s, cfg.train.batch_size) for s in range(warmup + steps)]
    if pack:
        batches = [pack_batch(b, cfg.model, pack) for b in batches]
    if dense:
        for b in batches:
            b["kind"] = torch.where(b["kind"] == 0, 0, 1)
            b["tokens"] = torch.randint(10, cfg.model.vocab_size, b["kind"].shape) * (b["kind"] != 0)
            b["text_targets"] = torch.where(b["kind"] != 0, b["tokens"], -100)
            b["is_gen"] = torch.zeros_like(b["is_gen"])
            b["images"] = b["images"][:0]
    dev = torch.device("cpu")
    times, toks, flops = [], 0, 0.0
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        if dense:
            with autocast(cfg.train.precision, dev):
                h = model.embed_text(batch["tokens"])
                kind = batch["kind"]
                pos = torch.arange(kind.shape[1]).expand_as(kind)
                hid = model.forward_hidden(h, kind, pos)
                sel = batch["text_targets"] != -100
                loss = torch.nn.functional.cross_entropy(model.lm_logits(hid[sel]).float(), batch["text_targets"][sel])
        else:
            with autocast(cfg.train.precision, dev):
                loss = model(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not dense:
            model.update_ema_encoder()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            toks += int((batch["kind"] != 0).sum())
            if dense:
                c = cfg.model
                n = int((batch["kind"] != 0).sum())
                L = batch["kind"].shape[1]
                per = c.n_layers * (c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads) + 3 * c.dim * c.ffn_hidden
                                    + 2 * L * c.n_heads * c.head_dim) + c.dim * c.vocab_size
                flops += 6 * n * per
            else:
                flops += model_flops(model, batch)
    wall = sum(times)
    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("ema_encoder."))
    return {"tokens_per_s": toks / wall, "step_s": wall / len(times), "flops_per_s": flops / wall, "params": params,
            "tokens_per_step": toks / len(times)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="shapes")
    p.add_argument("--variants", nargs="+", default=["dense", "vlm", "pixel", "pixel_rf", "pixel_repa", "pixel_cont"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--arms", nargs="+", default=["preset="], metavar="LABEL=KEY=VAL,...", help="settings, each run "
                   "for each variant and pack: a label, then comma-separated config overrides (none: the preset), "
                   "e.g. gen_only=train.train_only=generation,data.gen_fraction=1.0 (the demo's pixel stage)")
    p.add_argument("--pack", type=int, nargs="+", default=[0], help="rows of this many positions (0 = one padded row "
                   "per sample); each value is run for each variant but dense")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    peak_bf16, peak_fp32 = matmul_peak(torch.bfloat16), matmul_peak(torch.float32)
    print(json.dumps({"what": "matmul_peak", "bf16_flops": peak_bf16, "fp32_flops": peak_fp32,
                      "threads": torch.get_num_threads()}))
    with tempfile.TemporaryDirectory() as d:
        tok = build_world_tokenizer(d)
    for arm in args.arms:
        label, _, sets = arm.partition("=")
        sets = [x for x in sets.split(",") if x]
        for v in args.variants:
            cfg = preset(args.preset, "pixel" if v == "dense" else v)
            cfg = C.override(cfg, [f"train.precision={args.precision}", f"model.vocab_size={len(tok)}", *sets])
            for pack in [0] if v == "dense" else args.pack:
                r = bench(cfg, tok, args.steps, args.warmup, dense=(v == "dense"), pack=pack)
                peak = peak_bf16 if args.precision == "bf16" else peak_fp32
                # mfu counts a full backward, also through frozen weights (train.train_only): compare step_s there
                r.update(what="train_throughput", preset=args.preset, variant=v, precision=args.precision, pack=pack,
                         mfu=r["flops_per_s"] / peak, arm=label, set=sets)
                print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
