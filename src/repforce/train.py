"""The trainer: one loop for every variant, resumable bit for bit.

    repforce train --preset shapes --variant vlm --out runs/vlm
    repforce train --preset shapes --variant pixel_rf --init runs/vlm --out runs/pixel_rf
    repforce train --out runs/pixel_rf --resume --steps 4000

A run folder holds config.json (the resolved config), tokenizer/, log.jsonl (one line per
logged step: every loss term, codebook usage, lr, tokens/s, step time) and
checkpoints/step_*/ (see checkpoint.py). Batches are a pure function of the step, the
RNG state is saved, so a run resumed from a checkpoint gives the same losses as one
that never stopped.
"""

from __future__ import annotations

import copy
import fcntl
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from . import checkpoint, packing, pretrained, runtime
from .codebook import KMEANS_BATCHES, KMEANS_STEP, fit_quantizer
from .config import Config, DataConfig, validate
from .data import build_world_tokenizer, local_batch, make_stream, sample_at
from .model import RFModel
from .parallelize import parallelize, shard_like
from .sequence import Layout
from .tokenizer import load_tokenizer
from .trainable import make_optimizer, set_trainable
from .vae import VAEEncoder, decode, encode, make_vae

class RunError(Exception):
    """A run that cannot start: printed as one line by the CLI."""


class Stopped(KeyboardInterrupt):
    """A run stopped by SIGTERM or SIGINT (a preempted job, Ctrl-C) after it saved a checkpoint of its last
    finished step. A KeyboardInterrupt, so no `except Exception` on the way swallows it; `code` is the usual
    128 + signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.code = 128 + signum


@contextmanager
def stop_on_signals(signals=(signal.SIGTERM, signal.SIGINT)):
    """Within the block, these signals only set `got[0]` (the signal number); the loop stops at its next step
    boundary. Handlers can be set only in the main thread; elsewhere the block changes nothing."""
    got: list[int | None] = [None]
    if threading.current_thread() is not threading.main_thread():
        yield got
        return

    def on_signal(signum, frame):
        if got[0] is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now, without saving
            raise KeyboardInterrupt
        got[0] = signum

    before = {s: signal.signal(s, on_signal) for s in signals}
    try:
        yield got
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def lr_factor(step: int, cfg: Config) -> float:
    o = cfg.optim
    if step < o.warmup:
        return (step + 1) / o.warmup
    if o.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - o.warmup) / max(1, cfg.train.steps - o.warmup))
    return o.min_lr_frac + (1 - o.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def update_weight_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """The weight EMA used for sampling: EMA of the parameters; buffers (the quantizer's prototypes)
    and the EMA encoder (already an average) copied exactly."""
    pairs = list(zip(ema.named_parameters(), model.parameters()))
    avg = [(ep, mp.detach()) for (name, ep), mp in pairs if not name.startswith("ema_encoder.")]
    torch._foreach_lerp_([e for e, _ in avg], [m for _, m in avg], 1 - decay)
    for (name, ep), mp in pairs:
        if name.startswith("ema_encoder."):
            ep.copy_(mp)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)


def prepare_run(cfg: Config, out: Path, resume: bool) -> tuple[Config, object]:
    """Folder, tokenizer and vocabulary size of a run; refuses to clobber saved work."""
    out = Path(out)
    has_ckpt = bool(checkpoint.step_dirs(out / "checkpoints"))
    if has_ckpt and not resume:
        raise RunError(f"{out} already holds checkpoints; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.run_id(out)  # made once; every checkpoint carries it
    tok_dir = out / "tokenizer"
    if not tok_dir.exists() and runtime.is_main():  # one writer under torchrun
        init_tok = checkpoint.resolve(cfg.train.init) / "tokenizer" if cfg.train.init else None
        if init_tok is not None and init_tok.is_dir():
            shutil.copytree(init_tok, tok_dir)
        elif cfg.train.llm:  # the LLM's own tokenizer, our special tokens added
            load_tokenizer(cfg.train.llm).save(tok_dir)
        else:
            build_world_tokenizer(tok_dir)
    runtime.barrier()
    tok = load_tokenizer(tok_dir)
    cfg = replace(cfg, model=replace(cfg.model, vocab_size=len(tok)))
    return pretrained.config_for_folders(cfg, tok), tok  # architecture of train.llm / train.vision / a diffusers VAE


def init_weights_from(model: RFModel, path: str) -> dict:
    """Start from another run's EMA weights (a vlm run for the generation variants)."""
    try:
        state, _ = checkpoint.read(Path(path))
    except checkpoint.CheckpointError as e:
        raise RunError(f"--init: {e}") from None
    return pretrained.init_from_vlm(model, state["ema"])


def build_model(cfg: Config, device: torch.device, init_fn=None, fresh: bool = True):
    """The trained model, its EMA and the init report, for one process or a sharded run.

    Small models are built whole on every rank with the same seed, so a sharded run starts
    from exactly the weights of a single-process one. With cfg.train.meta_init (the scale
    presets) the model is built on the meta device, sharded, materialized and initialized
    shard by shard: no rank ever holds all of it. Then pretrained weights (train.llm,
    train.vision; only for a fresh run without init_fn) or init_fn (a previous stage) are
    copied in, shard by shard too, and the EMA starts equal to the result.
    train.train_only freezes every parameter outside its name prefixes (stage 1), or outside
    is_gen_param when it is "generation"; train.freeze those inside its own."""
    t = cfg.train
    sharded = runtime.world_size() > 1
    if t.meta_init:
        with torch.device("meta"):
            model = RFModel(cfg.model)
            ema = RFModel(cfg.model)
    else:
        model = RFModel(cfg.model)
        ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    set_trainable(model, t)
    if sharded or t.act_ckpt or t.compile:
        mixed = device.type == "cuda" and t.precision != "fp32"
        parallelize(model, device, mixed, t.act_ckpt, t.compile, shard=sharded)
    if sharded:
        shard_like(ema, device)
    if t.meta_init:
        for m in (model, ema):
            m.to_empty(device=device)
            m.init_weights()
    else:
        model.to(device)
        ema.to(device)
    report = None
    if (t.llm or t.vision) and fresh and init_fn is None:
        report = pretrained.load_hf(model, t.llm or None, t.vision or None)
    if t.encoder_init and fresh and init_fn is None:
        loaded = pretrained.load_world_encoder(model, t.encoder_init, cfg.data.world)["loaded"]
        report = {**(report or {}), "encoder_init": loaded}
    if init_fn is not None:
        report = init_fn(model)
    copy_weights_(ema, model)
    for m in (model, ema):
        m.set_attention(t.attention)  # full forwards: SDPA on a dense mask or FlexAttention (attention.py)
    return model, ema, report


@torch.no_grad()
def copy_weights_(dst: nn.Module, src: nn.Module) -> None:
    """dst's parameters and buffers <- src's, in registration order (names may differ by wrappers)."""
    for a, b in zip(dst.parameters(), src.parameters()):
        a.copy_(b.detach())
    for a, b in zip(dst.buffers(), src.buffers()):
        a.copy_(b)


LOCK = ".lock"  # in a run folder while a process trains it


def lock_run(out: Path):
    """An exclusive advisory lock on out/.lock holding this process's pid, or RunError naming the holder.
    The kernel drops the lock when its process dies, however it dies, so a killed run never leaves it stuck."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fh = open(out / LOCK, "a+")
    except OSError as e:
        raise RunError(f"cannot write to the run folder {out}: {e.strerror}") from None
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        raise RunError(f"{out} is being trained by another process (pid {holder}); wait for it to stop or choose "
                       "another --out (nothing was touched)") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


def train(cfg: Config, out: str | Path, resume: bool = False, progress: bool = True,
          minutes: float | None = None, device: str | None = None) -> dict:
    """Train a run to cfg.train.steps (or until `minutes` of wall time), checkpointing on the way.

    SIGTERM or SIGINT stops the run at the end of the current step: it saves a checkpoint there and raises
    Stopped, so a preempted job loses no finished step and `--resume` continues it. One process trains a
    run folder at a time (lock_run): a second one is refused with the first one's pid.

    Returns a summary: final step, last logged losses, wall time, tokens/s."""
    out = Path(out)
    validate(cfg)
    rt = runtime.setup(device or cfg.train.device)  # torchrun's env -> process group; else one process
    lock = lock_run(out) if rt.is_main else None
    try:
        return _train(cfg, out, resume, progress, minutes, rt)
    finally:
        if lock is not None:
            lock.close()  # closing drops the lock; the file stays, unlocked


def _train(cfg: Config, out: Path, resume: bool, progress: bool, minutes: float | None, rt) -> dict:
    cfg, tok = prepare_run(cfg, out, resume)
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    dev = rt.device
    if t.attention == "flex" and dev.type != "cuda":  # train.device=auto that found no GPU
        raise RunError(f"train.attention=flex trains on CUDA (FlexAttention has no CPU backward); this run is on {dev}")
    torch.manual_seed(t.seed)
    init = (lambda m: init_weights_from(m, t.init)) if t.init and not resume else None
    model, ema, init_report = build_model(cfg, dev, init, fresh=not resume)  # sharded when world > 1
    opt = make_optimizer(model, cfg)
    step, spent = 0, {"wall_s": 0.0, "cpu_s": 0.0}  # time of the earlier legs of a resumed run
    try:
        state, passed_over = checkpoint.restore_newest(out, cfg.to_json()["model"], model, ema, opt,
                                                           Config.model_defaults()) if resume else (None, [])
    except checkpoint.CheckpointError as e:
        raise RunError(f"--resume: {e}") from None
    if state is not None:
        step, spent = state["step"], state.get("clock", spent)
    if rt.is_main:
        (out / "config.json").write_text(json.dumps(cfg.to_json(), indent=1))
    stream = make_stream(cfg, tok, Layout.for_model(cfg.model))  # the worlds, or real data (data.world=mix)
    vae = VAEEncoder(t.vae, dev) if cfg.model.variant.startswith("vae") else None

    pack = packing.packer(cfg) if t.tokens_per_rank else None  # rows of tokens_per_rank, several samples each

    def next_batch(step, pack=pack):
        batch = local_batch(stream, step, t.batch_size, t.seed, dev, pack)  # this rank's share
        if vae is not None and batch["is_gen"].any():
            batch["gen_x"] = vae(batch["images"])
        return batch

    precision, why = runtime.choose_precision(t.precision, dev, _step_timer(cfg, model, stream, vae, step, dev))
    log = runtime.main_file(out / "log.jsonl")  # rank 0 writes, the others write nowhere
    if passed_over:
        log.write(json.dumps({"resumed_at": step, "passed_over": passed_over}) + "\n")
    if init_report is not None and step == 0:
        log.write(json.dumps({"init": t.init, **{k: len(v) for k, v in init_report.items()}}) + "\n")
    log.write(json.dumps({"precision": precision, "why": why, "from_step": step}) + "\n")
    # a codebook that came with --init (a later stage) is kept: its ids are what the rep table learned
    if step == 0 and cfg.model.rep_init == "kmeans" and hasattr(model, "quantizer") and not model.quantizer.seeded:
        batches = [next_batch(KMEANS_STEP + i, pack=None) for i in range(KMEANS_BATCHES)]  # full-size images
        fitted = fit_quantizer(model, batches, cfg.model.rep_pool)
        copy_weights_(ema, model)  # step 0: the EMA is the model, now with the fitted codebook
        log.write(json.dumps({"kmeans": fitted}) + "\n")
    if rt.is_main and progress:
        tqdm.write(f"precision: {precision} ({why})")

    def save(final: bool = False):
        """A failed save (full disk, read-only folder) is logged and training goes on to the next one, its state
        untouched; the run's last save failing is a RunError: the newest checkpoint on disk is then the last state."""
        try:
            checkpoint.save(out / "checkpoints", step, model, ema, opt, cfg.to_json(), keep=t.keep,
                            extra={"clock": clock()} if rt.world == 1 else None)
        except checkpoint.CheckpointError as e:
            newest = checkpoint.step_dirs(out / "checkpoints")
            msg = f"{e} (newest checkpoint on disk: {newest[-1].name if newest else 'none'})"
            if final:
                raise RunError(f"{msg}; free space or make the folder writable, then resume") from None
            try:
                log.write(json.dumps({"save_failed_at": step, "error": str(e)}) + "\n")
                log.flush()
            except OSError:
                pass
            tqdm.write(f"repforce: {msg}; training goes on and the next checkpoint tries again", file=sys.stderr)

    start_time, start_cpu, last = time.time(), time.process_time(), {}

    def clock() -> dict:  # wall and process CPU seconds over every leg; CPU time does not count a SIGSTOP pause
        return {"wall_s": spent["wall_s"] + time.time() - start_time,
                "cpu_s": spent["cpu_s"] + time.process_time() - start_cpu}

    tokens_seen, window_t, window_tok = 0, time.time(), 0
    bad_in_row, bad_total = 0, 0  # steps skipped for a non-finite loss or gradient
    # with a wall-time budget the bar counts its seconds (the step count is then only an upper bound)
    budget = minutes is not None
    bar = tqdm(total=round(minutes * 60) if budget else t.steps, initial=0 if budget else step, unit="s" if budget
               else "it", disable=not progress or not rt.is_main, desc=f"{cfg.model.variant}", dynamic_ncols=True)
    model.train()
    stopped = False
    with stop_on_signals() as got:
        while step < t.steps:
            t0 = time.time()
            batch = next_batch(step)
            for g in opt.param_groups:
                g["lr"] = cfg.optim.lr * g["lr_mult"] * lr_factor(step, cfg)
            with runtime.autocast(precision, dev):
                losses = model(batch)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            gnorm = runtime.clip_grad_norm_(model.parameters(), cfg.optim.clip)
            finite = bool(torch.isfinite(losses["loss"].detach()).item() and torch.isfinite(gnorm).item())
            if runtime.any_rank(not finite, dev):  # skipped on every rank: no update, no EMA, the batch is spent
                opt.zero_grad(set_to_none=True)
                bad_in_row, bad_total = bad_in_row + 1, bad_total + 1
                log.write(json.dumps({"step": step + 1, "skipped": "non-finite loss or gradient",
                                      "loss": float(losses["loss"].detach()), "grad_norm": float(gnorm),
                                      "in_a_row": bad_in_row}) + "\n")
                log.flush()
                if bad_in_row >= t.max_bad_steps:  # validate: >= 1
                    raise RunError(f"{bad_in_row} steps in a row with a non-finite loss or gradient (at step {step + 1}; "
                                   f"train.max_bad_steps={t.max_bad_steps}); nothing was saved from them, the last "
                                   f"checkpoint in {out / 'checkpoints'} is the last good state")
            else:
                bad_in_row = 0
                opt.step()
                model.update_ema_encoder()
                update_weight_ema(ema, model, min(t.ema, (1 + step) / (10 + step)))  # warmup: early weights fade fast
            step += 1
            n_tok = int((batch["kind"] != 0).sum())
            tokens_seen += n_tok
            window_tok += n_tok
            if budget:
                bar.n = min(bar.total, round(time.time() - start_time))
                bar.refresh()
            else:
                bar.update(1)
            stopped = runtime.any_rank(got[0] is not None, dev)  # every rank stops at the same step
            out_of_time = minutes is not None and runtime.any_rank(time.time() - start_time > minutes * 60, dev)
            if step % t.log_every == 0 or step == t.steps or stopped or out_of_time:  # a run's last step is logged
                now = time.time()
                row = {"step": step, "lr": opt.param_groups[0]["lr"] / opt.param_groups[0]["lr_mult"],
                       "grad_norm": float(gnorm), "step_time": now - t0, "tokens_per_s": window_tok / (now - window_t)}
                row.update(runtime.mean_over_ranks(losses))
                if bad_total:
                    row["skipped_total"] = bad_total
                row.update(getattr(stream, "log_stats", dict)())  # real data: samples skipped, per reason
                log.write(json.dumps(row) + "\n")
                log.flush()
                window_t, window_tok = now, 0
                last = row
                bar.set_postfix(({"step": step} if budget else {}) | {k.replace("loss_", ""): f"{v:.3f}" for k, v in
                                row.items() if k.startswith("loss")} | {"tok/s": f"{row['tokens_per_s']:.0f}"})
            if stopped or out_of_time:
                break  # saved below
            if step % t.ckpt_every == 0 and step < t.steps and not bad_in_row:  # none inside a non-finite streak
                save()
    bar.close()
    try:
        save(final=True)
    finally:
        log.close()
    if stopped:
        name = signal.Signals(got[0]).name if got[0] is not None else "a signal on another rank"
        raise Stopped(f"stopped by {name} at step {step} of {t.steps}; checkpoint saved in {out / 'checkpoints'}; "
                      f"continue with: repforce train --out {out} --resume", got[0] or signal.SIGTERM)
    wall = time.time() - start_time
    return {"step": step, **clock(), "skipped_nonfinite": bad_total, "threads": torch.get_num_threads(), "tokens_per_s": tokens_seen / max(wall, 1e-9),
            "precision": precision, "last": last, "run": str(out)}


def load_run_config(out: Path) -> Config:
    path = Path(out) / "config.json"
    if not path.exists():
        raise RunError(f"--resume: no config.json in {out}")
    return Config.from_json(json.loads(path.read_text()))


def _step_timer(cfg: Config, model: RFModel, stream, vae, step: int, device: torch.device):
    """One training step's forward and backward on this rank's batch of `step`, run on a copy of the
    model (a fresh unsharded one under torchrun): the precision probe. Leaves the run's model, its
    gradients and the RNG as they were; built on first use, so an explicit precision costs nothing."""
    made: dict = {}

    def work():
        with torch.random.fork_rng(devices=[]):
            if not made:
                made["model"] = copy.deepcopy(model) if runtime.world_size() == 1 else RFModel(cfg.model).to(device)
                batch = stream.batch(step, cfg.train.batch_size, runtime.rank(), runtime.world_size())
                made["batch"] = {k: v.to(device) for k, v in batch.items()}
                if vae is not None and made["batch"]["is_gen"].any():
                    made["batch"]["gen_x"] = vae(made["batch"]["images"])
            made["model"](made["batch"])["loss"].backward()
    return work


# ----------------------------------------------------------------------------- the VAE of the vae variants


def _images(data: DataConfig, start: int, n: int) -> torch.Tensor:
    arr = np.stack([sample_at(data, start + i, gen_fraction=1.0).image for i in range(n)])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1  # (n, 3, H, W)


def train_vae(out: str | Path, steps: int = 2000, batch_size: int = 32, lr: float = 1e-3, kl_weight: float = 1e-6,
              canvas: int = 32, seed: int = 0, progress: bool = True, data: DataConfig | None = None) -> dict:
    """Train the VAE on the world's generation images; save it with its latent scaling.

    data: the run's data config (world, composites, ...); its canvas and seed are set here."""
    out = Path(out)
    if steps < 1:
        raise ValueError(f"steps={steps}: must be >= 1")
    torch.manual_seed(seed)
    data = replace(data or DataConfig(), canvas=canvas)
    train_data = replace(data, seed=seed + 7919)  # its own slice of the train stream
    vae = make_vae(canvas=canvas)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    t0 = time.time()
    bar = tqdm(range(steps), disable=not progress, desc="vae", dynamic_ncols=True)
    for step in bar:
        x = _images(train_data, step * batch_size, batch_size)
        post = vae.encode(x).latent_dist
        with runtime.autocast("auto", torch.device("cpu")):  # bf16 only where it is fast: emulated bf16 is ~100x slower
            recon = vae.decode(post.sample()).sample
        rec = F.mse_loss(recon.float(), x)
        kl = post.kl().mean() / x[0].numel()
        loss = rec + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, 0.5 * (1 + np.cos(np.pi * step / steps)) + 0.05)
        if step % 20 == 0:
            bar.set_postfix(mse=f"{rec.item():.4f}")
    wall = time.time() - t0
    vae.eval()
    with torch.no_grad():
        held = _images(replace(data, seed=seed + 104729), 0, 256)
        z = vae.encode(held).latent_dist.mean
        shift, scale = float(z.mean()), float(1.0 / z.std())
        vae.register_to_config(shift_factor=shift, scaling_factor=scale)
        recon = decode(vae, encode(vae, held))
        mse = float(F.mse_loss(recon, held))
    psnr = 10 * np.log10(4.0 / mse)  # peak-to-peak 2 in [-1, 1]
    vae.save_pretrained(str(out))
    meta = {"world": data.world, "steps": steps, "batch_size": batch_size, "wall_s": wall, "heldout_mse": mse, "psnr_db": psnr,
            "shift_factor": shift, "scaling_factor": scale, "params": sum(p.numel() for p in vae.parameters())}
    (out / "vae_meta.json").write_text(json.dumps(meta, indent=1))
    return meta
