"""Training throughput of the single-GPU scale preset on a GPU: tokens/s, MFU against the H200's bf16
dense peak (989 TFLOP/s), peak memory. Prints one JSON object per line; the last is the summary.

    .venv/bin/python benchmarks/gpu_small_preset.py                       # 300 steps at 256 px, cuda
    .venv/bin/python benchmarks/gpu_small_preset.py --act-ckpt --compile  # the options of the preset
    .venv/bin/python benchmarks/gpu_small_preset.py --smoke               # 2 steps of a tiny model, CPU

The model is `scale_small_s2` (Qwen3-0.6B + DINOv3 ViT-S/16 MoT, pixel_rf, 256 px, K = 16,384)
with random weights: the benchmark never needs a download. Batches are synthetic but shaped
like real ones (the trainer's batch contract, half generation and half understanding
samples, captions of 20-60 words, Qwen3's vocabulary size), built before the clock starts.
Each step is the trainer's step (train.build_model, local_batch-style loss divisors,
bf16 autocast, AdamW, clip, EMA encoder and weight EMA updates).

MFU counts matmul FLOPs analytically, per step: backbone linears with one MoT expert per
token, attention scores and values over the padded length (what SDPA with a mask
computes), the LM head at text targets, rep head at rep slots, gen embed/head at gen
slots, the encoder on understanding images, all x3 for forward + backward; plus the EMA
encoder's forward on generation images (x1). It is divided by the measured step time
and by 989e12 (H200 SXM bf16 dense peak).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch

from repforce import config as C
from repforce import runtime
from repforce import train as T
from repforce.data import build_world_tokenizer
from repforce.presets import preset
from repforce.sequence import GEN, REP, Layout, Sample, collate_samples
from repforce.trainable import param_groups

from gpu_check import train_step  # benchmarks/ (this script's folder): the trainer's step, written once

H200_BF16 = 989e12  # FLOP/s, dense
WORDS = ("a red circle small large blue square green triangle photo of the cat dog sitting on under next to "
         "wooden table city street at night with two three people bright sunny morning").split()


def smoke_config() -> C.Config:
    """A tiny Qwen3-shaped backbone and a tiny DINOv3 tower at 32 px, on CPU in fp32."""
    from repforce.presets import DINOV3_VITS16
    from repforce.pretrained import encoder_fields

    cfg = preset("scale_small_s2", "pixel_rf")
    vit = dict(DINOV3_VITS16, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
               patch_size=8)
    model = replace(cfg.model, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32, ffn_hidden=96,
                    vocab_size=600, codebook_size=64, image_size=32, gen_size=32, gen_patch=8,
                    **encoder_fields(config=vit))
    return replace(cfg, model=model, train=replace(cfg.train, device="cpu", precision="fp32", meta_init=False,
                                                   act_ckpt=False, batch_size=4))


def synthetic_batches(cfg: C.Config, tok, n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    side, b = cfg.model.image_size, cfg.train.batch_size
    out = []
    for _ in range(n):
        samples = []
        for i in range(b):
            img = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            words = " ".join(rng.choice(WORDS, rng.integers(20, 61)))
            if i % 2 == 0:
                samples.append(Sample(True, img, words, "", drop_rep=bool(rng.random() < 0.1)))
            else:
                samples.append(Sample(False, img, "describe the image.", words))
        batch = collate_samples(samples, tok, Layout.for_model(cfg.model))
        keep = batch["is_gen"] & ~batch["drop_rep"]
        batch["noise_seed"] = torch.arange(b) + len(out) * b
        batch["norm_lm"] = (batch["text_targets"] != -100).sum().float()
        batch["norm_rep"] = ((batch["kind"] == REP) & keep[:, None]).sum().float()
        batch["norm_gen"] = batch["is_gen"].sum().float()
        out.append(batch)
    return out


def step_flops(cfg: C.Config, batch: dict) -> float:
    """Matmul FLOPs of one training step (see the module docstring)."""
    c = cfg.model
    kind = batch["kind"]
    n_tok, L = int((kind != 0).sum()), kind.shape[1]
    attn = c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)
    ffn = 3 * c.dim * c.ffn_hidden * (c.moe_top_k if c.moe_experts else 1)
    fwd = 2 * n_tok * c.n_layers * (attn + ffn) + 2 * n_tok * c.n_layers * 2 * L * c.n_heads * c.head_dim
    fwd += 2 * int((batch["text_targets"] != -100).sum()) * c.dim * c.vocab_size
    fwd += 2 * int((kind == GEN).sum()) * c.dim * c.patch_values * 2
    fwd += 2 * int((kind == REP).sum()) * c.dim * c.codebook_size
    hf = json.loads(c.enc_hf) if c.enc_hf else {}
    gated = 3 if hf.get("use_gated_mlp") else 2
    mlp = hf.get("intermediate_size", int(c.enc_dim * c.enc_mlp_ratio))
    enc_tok = c.n_enc + 1 + hf.get("num_register_tokens", 0)
    enc = c.enc_layers * enc_tok * (2 * 4 * c.enc_dim ** 2 + 2 * gated * c.enc_dim * mlp + 4 * enc_tok * c.enc_dim)
    connector = c.n_enc * 2 * (c.enc_dim * c.dim + c.dim * c.dim)
    fwd += int((~batch["is_gen"]).sum()) * (enc + connector)
    return 3 * fwd + int(batch["is_gen"].sum()) * enc  # EMA encoder: forward only


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch-size", dest="batch_size", type=int, help="default: the preset's (32)")
    p.add_argument("--act-ckpt", dest="act_ckpt", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--smoke", action="store_true", help="2 steps of a tiny model on CPU: checks the script runs")
    args = p.parse_args()
    if args.smoke:
        cfg, args.steps, args.warmup = smoke_config(), 2, 0
    else:
        cfg = preset("scale_small_s2", "pixel_rf")
        cfg = replace(cfg, train=replace(cfg.train, act_ckpt=args.act_ckpt, compile=args.compile))
    if args.batch_size:
        cfg = replace(cfg, train=replace(cfg.train, batch_size=args.batch_size))
    dev = runtime.setup(cfg.train.device).device
    with tempfile.TemporaryDirectory() as d:
        tok = build_world_tokenizer(d, n_scenes=200)
    torch.manual_seed(0)
    model, ema, _ = T.build_model(cfg, dev)
    model.train()
    fused = dev.type == "cuda"
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.optim.lr, betas=cfg.optim.betas, fused=fused)
    batches = synthetic_batches(cfg, tok, min(args.warmup + args.steps, 16))
    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("ema_encoder."))
    print(json.dumps({"what": "setup", "device": str(dev), "params": params, "batch_size": cfg.train.batch_size,
                      "image_size": cfg.model.image_size, "act_ckpt": cfg.train.act_ckpt,
                      "compile": cfg.train.compile}), flush=True)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timed, tokens, flops, losses = 0.0, 0, 0.0, []
    for i in range(args.warmup + args.steps):
        batch = {k: v.to(dev, non_blocking=True) for k, v in batches[i % len(batches)].items()}
        sync()
        t0 = time.perf_counter()
        loss = train_step(model, ema, opt, cfg, batch, cfg.train.precision, dev)
        sync()
        dt = time.perf_counter() - t0
        losses.append(float(loss))
        if i >= args.warmup:
            timed += dt
            tokens += int((batch["kind"] != 0).sum())
            flops += step_flops(cfg, batch)
        if i % 50 == 0 or i == args.warmup + args.steps - 1:
            print(json.dumps({"step": i, "loss": losses[-1], "step_s": dt}), flush=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    n = max(args.steps, 1)
    print(json.dumps({"what": "summary", "steps": args.steps, "tokens_per_s": tokens / timed, "step_s": timed / n,
                      "tflops_per_s": flops / timed / 1e12, "mfu_h200_bf16": flops / timed / H200_BF16,
                      "peak_mem_gib": peak, "loss_first": losses[0], "loss_last": losses[-1],
                      "finite": bool(np.isfinite(losses).all())}), flush=True)


if __name__ == "__main__":
    main()
