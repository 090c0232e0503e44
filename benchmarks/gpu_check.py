"""The GPU check of issue 20: four checks, one JSON line each, on one H200 in under 8 minutes.

    bash benchmarks/gpu_check.sh                         # the H200 check (what a session lent the device runs)
    bash benchmarks/gpu_check.sh --device cpu --tiny     # the same code at toy size on CPU (tests/test_gpu_check.py)
    bash benchmarks/gpu_check.sh --only moe_grouped_cuda  # one check

Checks (each line has "check", "seconds", and "ok" (the check's criteria met), "error" or "skipped"):

  cuda_parity         the tiny preset (pixel_rf) on CUDA against the CPU in fp32, TF32 off: the same
                      batch's losses (|cuda - cpu| <= 1e-4 * max(1, |cpu|) each) and gradients
                      (relative L2 <= 1e-3 each), and one image sampled by the engine with the same seed
                      (uint8, max |cuda - cpu| <= 2 levels). The two devices' generators give different
                      streams for one seed, so during this check the flow noise (model._sample_noise,
                      engine.randn) is drawn on the CPU and moved, and rep tokens are greedy.
  scale_small_packed  scale_small_s2 (Qwen3-0.6B + DINOv3 ViT-S/16, pixel_rf, K = 16,384) at 256 px from
                      random weights, packed: train.tokens_per_rank=32768, image_sides=128,192,256,
                      attention=flex, bf16, the preset's activation checkpointing; 100 timed steps of the
                      trainer's step after warmup (one warmup step per distinct batch, so FlexAttention's
                      compilation is outside the clock). Data: the shapes world rendered at 256 px (the
                      renderer draws any canvas; the run config's data.canvas allows 32 or 64 only, so this
                      builds a WorldStream directly), 4 distinct batches of 150 samples made before the
                      clock, held on the device and cycled. Reports tokens/s (non-padding positions), MFU
                      and peak memory (torch.cuda.max_memory_allocated over setup and steps).
  shapes_steps        the shapes preset (pixel_rf, batch 32, 32 px, bf16) from random weights: steps/s of
                      the trainer's step on 10 batches made before the clock, and the CPU seconds a batch
                      takes to make (the trainer makes them inline: steps_per_s_with_data).
  moe_grouped_cuda    one Qwen3-30B-A3B expert bank (128 experts, top-8, dim 2048, hidden 768) in bf16 on
                      8192 tokens: backbone.grouped_mm_ok is true, MoEFFN's grouped output equals
                      moe_loop_reference within bf16 tolerance (relative L2 <= 1e-2; for scale, both
                      against fp32 arithmetic on the same weights, which also counts the tokens whose top-k
                      flips under bf16 router logits), and the forward makes no host sync
                      (torch.cuda.set_sync_debug_mode "error" around it; the backward is tried the same way
                      and reported); forward and forward+backward tokens/s of both.

MFU (scale_small_packed) = FLOPs / step time / 989e12 (H100/H200 SXM dense bf16 peak), with

    FLOPs per step = 6 * N_active * T + 12 * n_layers * n_heads * head_dim * sum_d L_d^2

N_active the backbone's matmul parameters one token uses (attention projections and one MoT expert's
FFN; a MoE bank: its router and top_k experts), T the non-padding positions of the packed rows, L_d
each packed sample's length (attention stays inside a sample). Not counted: embeddings, the LM / rep /
pixel heads, the ViT and its EMA copy, the optimizer; counted though the kernel skips it: the causal
part of each L_d x L_d square. At 256 px each is a few percent of the total (about 78 TFLOP a step,
of which the attention term is about 4).

With --device cuda (the default) every check runs in its own process under a time limit (a crash or a
CUDA error in one cannot take the others down; a check over its limit is killed, with what it started,
and reported); the limits add up to 435 s. With --device cpu the checks share one process (--isolate
to change it), the two GPU-only ones print {"check": ..., "skipped": "no CUDA"}, and --tiny is needed
(toy models, fp32, SDPA). If FlexAttention fails to compile on the device, `--only scale_small_packed
--attention sdpa` measures the same packed rows with the dense-mask path (1 GiB of mask per row).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback

# torch and repforce are imported inside the functions: the parent that runs each check in a process of its
# own never loads them.
CHECKS = ("cuda_parity", "scale_small_packed", "shapes_steps", "moe_grouped_cuda")
GPU_ONLY = ("cuda_parity", "moe_grouped_cuda")
LIMITS = {"cuda_parity": 60, "scale_small_packed": 240, "shapes_steps": 75, "moe_grouped_cuda": 60}  # s, on an H200
PEAK = 989e12  # FLOP/s, H100/H200 SXM dense bf16
LOSS_TOL, GRAD_TOL, IMAGE_TOL, MOE_TOL = 1e-4, 1e-3, 2, 1e-2


# ----------------------------------------------------------------------------- shared


def tokenizer(folder: str, tiny: bool = False):
    """The worlds' tokenizer, built once into folder and loaded by the later checks."""
    from repforce.data import build_world_tokenizer
    from repforce.tokenizer import load_tokenizer

    if os.path.exists(os.path.join(folder, "tokenizer.json")):
        return load_tokenizer(folder)
    return build_world_tokenizer(folder, n_scenes=50 if tiny else 200)


def sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def peak_gib(dev) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(dev) / 2**30, 3) if dev.type == "cuda" else None


@contextlib.contextmanager
def patched(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def train_step(model, ema, opt, cfg, batch, precision, dev):
    """The trainer's step (train._train, without its logging and non-finite bookkeeping); the loss tensor."""
    from repforce import runtime
    from repforce.train import update_weight_ema

    with runtime.autocast(precision, dev):
        out = model(batch)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    runtime.clip_grad_norm_(model.parameters(), cfg.optim.clip)
    opt.step()
    model.update_ema_encoder()
    update_weight_ema(ema, model, cfg.train.ema)
    return out["loss"].detach()


def timed_steps(model, ema, cfg, batches, warmup: int, steps: int, precision: str, dev) -> dict:
    """warmup then `steps` timed training steps over batches (cycled, already on dev): seconds and losses."""
    import torch

    from repforce.trainable import param_groups

    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.optim.lr, betas=cfg.optim.betas)
    model.train()
    losses = []
    for i in range(warmup):
        losses.append(train_step(model, ema, opt, cfg, batches[i % len(batches)], precision, dev))
    sync(dev)
    t0 = time.perf_counter()
    for i in range(steps):
        losses.append(train_step(model, ema, opt, cfg, batches[(warmup + i) % len(batches)], precision, dev))
    sync(dev)
    seconds = time.perf_counter() - t0
    losses = [float(x) for x in losses]
    return {"seconds": seconds, "loss_first": losses[0], "loss_last": losses[-1],
            "finite": all(map(math.isfinite, losses))}


# ----------------------------------------------------------------------------- cuda_parity


def cuda_parity(args, dev) -> dict:
    """The tiny model on dev against the CPU (module docstring). The tests pass the CPU as dev: every
    difference must then be 0."""
    import copy

    import torch

    from repforce import engine as E
    from repforce import model as M
    from repforce.data import WorldStream, local_batch
    from repforce.presets import preset
    from repforce.sequence import Layout

    cpu = torch.device("cpu")
    cfg = preset("tiny", "pixel_rf")
    tok = tokenizer(args.tok, args.tiny)
    torch.manual_seed(0)
    base = M.RFModel(cfg.model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # zero-initialized heads and modulations would make the comparison trivial
        for p in base.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    stream = WorldStream(cfg.data, tok, Layout.for_model(cfg.model))
    batch = local_batch(stream, 0, cfg.train.batch_size, cfg.train.seed, cpu)
    orig_noise = M._sample_noise

    def cpu_noise(seeds, x, c):  # the CPU's stream for both devices
        e, t = orig_noise(seeds.cpu(), torch.empty(x.shape, dtype=x.dtype), c)
        return e.to(x.device), t.to(x.device)

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    losses, grads, images, reps = {}, {}, {}, {}
    try:
        for name, d in (("cpu", cpu), ("dev", dev)):
            model = copy.deepcopy(base).to(d).train()
            with patched(M, "_sample_noise", cpu_noise):
                out = model({k: v.to(d) for k, v in batch.items()})
            out["loss"].backward()
            losses[name] = {k: float(v.detach()) for k, v in out.items() if k.startswith("loss")}
            grads[name] = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
            gen = torch.Generator().manual_seed(0)
            eng = E.Engine(model.eval(), tok, device=str(d), precision="fp32")
            with patched(E, "randn", lambda _g, B, *shape, device: torch.randn(B, *shape, generator=gen).to(device)):
                img, rep = eng.generate_arrays(["a red circle"], n=1, seed=0,
                                               options=E.GenOptions(steps=10, rep_temperature=0.0))
            images[name], reps[name] = img.astype("int16"), rep
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    loss_diff = max(abs(losses["dev"][k] - v) / max(1.0, abs(v)) for k, v in losses["cpu"].items())
    floor = 1e-6 * float(torch.stack([gc.norm() for gc in grads["cpu"].values()]).norm())  # structurally zero grads
    grad_diff = max(float((grads["dev"][n] - gc).norm()) / max(float(gc.norm()), floor, 1e-30)
                    for n, gc in grads["cpu"].items())
    img_diff = int(abs(images["dev"] - images["cpu"]).max())
    same_reps = bool((reps["dev"] == reps["cpu"]).all())
    ok = loss_diff <= LOSS_TOL and grad_diff <= GRAD_TOL and img_diff <= IMAGE_TOL and same_reps
    return {"ok": ok, "preset": "tiny", "variant": "pixel_rf", "precision": "fp32 (TF32 off)",
            "losses_cpu": losses["cpu"], "losses_dev": losses["dev"], "loss_max_rel_diff": loss_diff,
            "loss_tol": LOSS_TOL, "grad_max_rel_l2_diff": grad_diff, "grad_tol": GRAD_TOL,
            "image_max_abs_diff": img_diff, "image_mean_abs_diff": float(abs(images["dev"] - images["cpu"]).mean()),
            "image_tol": IMAGE_TOL, "image_side": int(images["cpu"].shape[1]), "rep_ids_equal": same_reps,
            "sampling": "10 Euler steps, guidance 3 / rep 2, greedy rep tokens, noise drawn on the CPU"}


# ----------------------------------------------------------------------------- scale_small_packed


def n_active(m) -> int:
    """Backbone matmul parameters one token uses (module docstring)."""
    attn = m.dim * m.head_dim * (2 * m.n_heads + 2 * m.n_kv_heads)  # q, o; k, v (grouped-query)
    ffn = 3 * m.dim * m.ffn_hidden * (m.moe_top_k if m.moe_experts else 1) + m.dim * m.moe_experts  # + router
    return m.n_layers * (attn + ffn)


def step_flops(m, batch) -> float:
    """6 * N_active * T + 12 * n_layers * n_heads * head_dim * sum_d L_d^2 (module docstring)."""
    import torch

    doc = batch["doc"]
    lengths = torch.bincount(doc[doc >= 0].flatten()).double()  # (S,) each packed sample's positions
    T = float(lengths.sum())
    return 6 * n_active(m) * T + 12 * m.n_layers * m.n_heads * m.head_dim * float((lengths ** 2).sum())


def scale_config(args, dev):
    """scale_small_s2 packed at 256 px on the shapes world (module docstring); --tiny: the same code path on a toy
    model of the same kinds (Qwen3-shaped backbone, DINOv3 tower) at 32 px."""
    from dataclasses import replace

    from repforce.presets import DINOV3_VITS16, preset
    from repforce.pretrained import encoder_fields

    cfg = preset("scale_small_s2", "pixel_rf")
    t = dict(device=dev.type, tokens_per_rank=32768, image_sides="128,192,256", attention=args.attention or "flex",
             batch_size=150, precision="bf16")
    if args.tiny:  # a Qwen3-shaped backbone and a DINOv3 tower of a few layers, 32 px, fp32 (CPU: SDPA)
        vit = dict(DINOV3_VITS16, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   patch_size=8)
        cfg = replace(cfg, model=replace(cfg.model, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32,
                                         ffn_hidden=96, vocab_size=600, codebook_size=64, image_size=32, gen_size=32,
                                         gen_patch=8, **encoder_fields(config=vit)))
        t.update(tokens_per_rank=128, image_sides="16,32", batch_size=8, precision="fp32",
                 attention=args.attention or ("flex" if dev.type == "cuda" else "sdpa"))
    side = cfg.model.image_size
    return replace(cfg, data=replace(cfg.data, world="shapes", canvas=side), train=replace(cfg.train, **t))


def scale_small_packed(args, dev) -> dict:
    import torch

    from repforce import packing
    from repforce import train as T
    from repforce.data import WorldStream, local_batch
    from repforce.sequence import Layout

    cfg = scale_config(args, dev)
    t = cfg.train
    tok = tokenizer(args.tok, args.tiny)
    stream = WorldStream(cfg.data, tok, Layout.for_model(cfg.model))
    n_batches, steps = (2, 3) if args.tiny else (4, 100)
    t0 = time.perf_counter()
    batches = [local_batch(stream, s, t.batch_size, t.seed, torch.device("cpu"), packing.packer(cfg))
               for s in range(n_batches)]
    data_s = (time.perf_counter() - t0) / n_batches
    rows = [int(b["kind"].shape[0]) for b in batches]
    real = [int((b["kind"] != 0).sum()) for b in batches]
    flops = [step_flops(cfg.model, b) for b in batches]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    torch.manual_seed(t.seed)
    model, ema, _ = T.build_model(cfg, dev)  # meta_init, act_ckpt and attention as the run config says
    batches = [{k: v.to(dev) for k, v in b.items()} for b in batches]
    warmup = max(args.warmup, n_batches)  # every distinct batch shape compiled before the clock
    r = timed_steps(model, ema, cfg, batches, warmup, steps, t.precision, dev)
    order = [(warmup + i) % n_batches for i in range(steps)]
    tokens, total = sum(real[j] for j in order), sum(flops[j] for j in order)
    return {"ok": r["finite"], "preset": "scale_small_s2", "variant": "pixel_rf", "tiny": args.tiny,
            "image_size": cfg.model.image_size, "image_sides": t.image_sides, "tokens_per_rank": t.tokens_per_rank,
            "batch_size": t.batch_size, "attention": t.attention, "precision": t.precision, "act_ckpt": t.act_ckpt,
            "weights": "random (meta_init)", "data": f"shapes world rendered at {cfg.data.canvas} px, {n_batches} "
            "batches made before the clock and cycled", "data_s_per_batch": round(data_s, 3),
            "rows_per_step": sorted(set(rows)), "row_fill": round(sum(real) / (sum(rows) * t.tokens_per_rank), 3),
            "warmup": warmup, "steps": steps, "step_s": r["seconds"] / steps, "tokens_per_s": tokens / r["seconds"],
            "n_active": n_active(cfg.model),
            "flops_formula": "6*N_active*T + 12*n_layers*n_heads*head_dim*sum_d(L_d^2)",
            "tflops_per_s": total / r["seconds"] / 1e12, "mfu": total / r["seconds"] / PEAK, "peak_tflops": PEAK / 1e12,
            "peak_mem_gib": peak_gib(dev), "loss_first": r["loss_first"], "loss_last": r["loss_last"],
            "finite": r["finite"]}


# ----------------------------------------------------------------------------- shapes_steps


def shapes_steps(args, dev) -> dict:
    from dataclasses import replace

    import torch

    from repforce import train as T
    from repforce.data import WorldStream, local_batch
    from repforce.presets import preset
    from repforce.sequence import Layout

    name = "tiny" if args.tiny else "shapes"
    cfg = preset(name, "pixel_rf")
    precision = "bf16" if dev.type == "cuda" else "fp32"  # what train.precision=auto picks on a GPU
    # random weights: the preset's shipped world encoder (train.encoder_init) changes nothing a step costs
    cfg = replace(cfg, train=replace(cfg.train, device=dev.type, encoder_init="", precision=precision))
    tok = tokenizer(args.tok, args.tiny)
    stream = WorldStream(cfg.data, tok, Layout.for_model(cfg.model))
    n_batches, steps, warmup = (2, 3, 1) if args.tiny else (10, 100, 10)
    t0 = time.perf_counter()
    batches = [local_batch(stream, s, cfg.train.batch_size, cfg.train.seed, torch.device("cpu"))
               for s in range(n_batches)]
    data_s = (time.perf_counter() - t0) / n_batches
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    torch.manual_seed(cfg.train.seed)
    model, ema, _ = T.build_model(cfg, dev)
    batches = [{k: v.to(dev) for k, v in b.items()} for b in batches]
    r = timed_steps(model, ema, cfg, batches, warmup, steps, precision, dev)
    step_s = r["seconds"] / steps
    tokens = sum(int((batches[(warmup + i) % n_batches]["kind"] != 0).sum()) for i in range(steps))
    return {"ok": r["finite"], "preset": name, "variant": "pixel_rf", "batch_size": cfg.train.batch_size,
            "image_size": cfg.model.image_size, "precision": precision, "weights": "random",
            "warmup": warmup, "steps": steps, "steps_per_s": 1 / step_s, "step_s": step_s,
            "tokens_per_s": tokens / r["seconds"], "data_s_per_batch": round(data_s, 4),
            "steps_per_s_with_data": 1 / (step_s + data_s), "peak_mem_gib": peak_gib(dev),
            "loss_first": r["loss_first"], "loss_last": r["loss_last"], "finite": r["finite"]}


# ----------------------------------------------------------------------------- moe_grouped_cuda


def moe_grouped_cuda(args, dev) -> dict:
    """Grouped MoE against the loop (module docstring); on a CPU (tests) without the sync check."""
    import torch

    from repforce.backbone import MoEFFN, grouped_mm_ok, moe_loop_reference

    R, k, D, F, N = (16, 4, 128, 64, 256) if args.tiny else (128, 8, 2048, 768, 8192)
    torch.manual_seed(0)
    moe = MoEFFN(D, F, R, k).to(dev)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(std=0.02)
    moe = moe.bfloat16()
    ref = MoEFFN(D, F, R, k).to(dev)  # fp32 arithmetic on the same (bf16-valued) weights and inputs
    ref.load_state_dict({n: p.float() for n, p in moe.state_dict().items()})
    x = torch.randn(N, D, device=dev).bfloat16()
    x32 = x.float()
    ok_mm = grouped_mm_ok(x, D, F)

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    with torch.no_grad():
        y_ref = moe_loop_reference(ref, x32)  # fp32
        y_loop, y_grouped = moe_loop_reference(moe, x), moe(x)  # moe(x): the path MoEFFN picks (grouped if ok_mm)
    errs = {"grouped_vs_loop": rel(y_grouped, y_loop), "grouped_vs_fp32": rel(y_grouped, y_ref),
            "loop_vs_fp32": rel(y_loop, y_ref)}
    no_sync = {"forward": None, "backward": None}
    if dev.type == "cuda":
        xg = x.detach().requires_grad_()
        sync(dev)
        for what in ("forward", "backward"):
            torch.cuda.set_sync_debug_mode("error")
            try:
                if what == "forward":
                    y = moe(xg)
                else:
                    y.float().square().mean().backward()
                no_sync[what] = True
            except RuntimeError as e:
                no_sync[what] = f"synced: {str(e).splitlines()[0][:200]}"
            finally:
                torch.cuda.set_sync_debug_mode(0)
            if what == "forward" and no_sync[what] is not True:
                y = moe(xg)  # for the backward attempt
        sync(dev)
    speed = {}
    for name, fn in (("loop", lambda v: moe_loop_reference(moe, v)), ("grouped", moe)):
        for backward in (False, True):
            reps = 1 if args.tiny else 10
            for i in range(reps + 1):  # the first is warmup
                if i == 1:
                    sync(dev)
                    t0 = time.perf_counter()
                if backward:
                    moe.zero_grad(set_to_none=True)
                    fn(x.detach().requires_grad_()).float().square().mean().backward()
                else:
                    with torch.no_grad():
                        fn(x)
            sync(dev)
            speed[f"{name}_{'train' if backward else 'forward'}_tokens_per_s"] = N * reps / (time.perf_counter() - t0)
    ok = ok_mm and errs["grouped_vs_loop"] <= MOE_TOL and (dev.type != "cuda" or no_sync["forward"] is True)
    return {"ok": ok, "grouped_mm_ok": ok_mm, "experts": R, "top_k": k, "dim": D, "hidden": F, "tokens": N,
            "dtype": "bf16", "rel_l2": errs, "tol": MOE_TOL, "no_host_sync": no_sync, **speed,
            "grouped_forward_vs_loop": speed["grouped_forward_tokens_per_s"] / speed["loop_forward_tokens_per_s"],
            "grouped_train_vs_loop": speed["grouped_train_tokens_per_s"] / speed["loop_train_tokens_per_s"]}


# ----------------------------------------------------------------------------- driver


RUN = {"cuda_parity": cuda_parity, "scale_small_packed": scale_small_packed, "shapes_steps": shapes_steps,
       "moe_grouped_cuda": moe_grouped_cuda}


class OverLimit(Exception):
    """A check ran past its time limit (in-process runs: SIGALRM)."""


def check_line(name: str, args) -> dict:
    """Run one check in this process: its line, where any failure is the "error"."""
    t0 = time.perf_counter()
    line = {"check": name}

    def over(signum, frame):
        raise OverLimit(f"over its {args.limit:g} s limit")

    old = signal.signal(signal.SIGALRM, over) if args.limit else None
    if args.limit:
        signal.setitimer(signal.ITIMER_REAL, args.limit)
    try:
        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            line["skipped"] = "no CUDA"
        else:
            dev = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
                line["device"] = torch.cuda.get_device_name(dev)
            line["torch"] = torch.__version__
            line.update(RUN[name](args, dev))
    except Exception as e:  # noqa: BLE001 - every failure becomes this check's line
        line["error"] = f"{type(e).__name__}: {e}"[:1000]
        line["where"] = traceback.format_exc().strip().splitlines()[-3:]
    finally:
        if args.limit:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    line["seconds"] = round(time.perf_counter() - t0, 1)
    return line


def run_isolated(name: str, argv: list[str], limit: float) -> None:
    """The check in a child process of its own session, killed (with whatever it started) past limit."""
    p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", name, *argv],
                         stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=limit)
        why = f"exited with {p.returncode} and printed no result line"
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        why = f"over its {limit:g} s limit: killed"
    lines = []
    for raw in out.splitlines():
        try:
            row = json.loads(raw)
        except ValueError:
            row = None
        if isinstance(row, dict) and row.get("check") == name:
            lines.append(raw)
        else:
            print(raw, file=sys.stderr)
    for raw in lines or [json.dumps({"check": name, "error": why, "limit_s": limit})]:
        print(raw, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (seconds on a CPU)")
    ap.add_argument("--only", nargs="+", choices=CHECKS, default=list(CHECKS), help="these checks, in this order")
    ap.add_argument("--attention", choices=["flex", "sdpa"], help="scale_small_packed: default flex (sdpa on CPU)")
    ap.add_argument("--warmup", type=int, default=2, help="scale_small_packed: at least one step per distinct batch")
    ap.add_argument("--limit-scale", dest="limit_scale", type=float, default=1.0, help="multiply every time limit")
    ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                    help="each check in a process of its own (default: with --device cuda); else one process, "
                         "limits by SIGALRM (they stop Python code, not a kernel or a compile in C++)")
    ap.add_argument("--child", choices=CHECKS, help=argparse.SUPPRESS)  # run_isolated's child: this one check
    ap.add_argument("--tok", help=argparse.SUPPRESS)  # the tokenizer folder the checks share
    ap.add_argument("--limit", type=float, default=0.0, help=argparse.SUPPRESS)  # in-process limit of a check, s
    args = ap.parse_args()
    if args.device == "cpu" and not args.tiny:
        ap.error("--device cpu runs the toy sizes only: add --tiny")
    if args.child:
        print(json.dumps(check_line(args.child, args)), flush=True)
        return
    isolate = args.device == "cuda" if args.isolate is None else args.isolate
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tok:
        argv = ["--device", args.device, "--tok", tok, "--warmup", str(args.warmup)]
        argv += (["--tiny"] if args.tiny else []) + (["--attention", args.attention] if args.attention else [])
        args.tok = tok
        for name in args.only:
            limit = LIMITS[name] * args.limit_scale
            if args.device == "cpu" and name in GPU_ONLY:
                print(json.dumps({"check": name, "skipped": "no CUDA", "seconds": 0.0}), flush=True)
            elif isolate:
                run_isolated(name, argv, limit)
            else:
                args.limit = limit
                print(json.dumps(check_line(name, args)), flush=True)


if __name__ == "__main__":
    main()
