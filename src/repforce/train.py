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

import json
import math
import shutil
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint, datasources, distributed, pretrained
from .config import Config, ConfigError, validate
from .rf import RFModel
from .sequence import Layout
from .tokenizer import build_world_tokenizer, load_tokenizer

GEN_MODULES = ("gen_embed", "gen_pos", "t_embed", "gen_head", "rep_", "null_rep", "cont_", "repa_proj")


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


_FAST_BF16: dict[str, bool] = {}


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> bf16 where bf16 matmuls are fast (GPUs, CPUs with AVX512-BF16/AMX), else fp32.

    On a CPU it times a small matmul in both dtypes once per process: on AVX2-only CPUs
    bf16 is emulated and about 100x slower than fp32, elsewhere it is several times faster."""
    if precision != "auto":
        return precision
    if device.type != "cpu":
        return "bf16"
    if "cpu" not in _FAST_BF16:
        import time

        def rate(dtype):
            a = torch.randn(256, 256, dtype=dtype)
            a @ a
            t0 = time.perf_counter()
            for _ in range(4):
                a @ a
            return time.perf_counter() - t0

        _FAST_BF16["cpu"] = rate(torch.bfloat16) < rate(torch.float32)
    return "bf16" if _FAST_BF16["cpu"] else "fp32"


def autocast(precision: str, device: torch.device):
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def layout_of(model_cfg) -> Layout:
    return Layout(model_cfg.n_enc, model_cfg.n_rep if model_cfg.rep_slots else 0, model_cfg.n_gen)


def is_gen_param(name: str) -> bool:
    """Parameters that exist for generation only: the gen/rep modules and the experts 1, 2."""
    return name.startswith(GEN_MODULES) or ".mlp.experts.1." in name or ".mlp.experts.2." in name


def param_groups(model: torch.nn.Module, cfg: Config) -> list[dict]:
    """AdamW groups: decay on matrices of linear layers only; gen parameters at gen_lr_mult."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim == 2 and "embed" not in name and not name.endswith("_pos")
        groups.setdefault((decay, is_gen_param(name)), []).append(p)
    out = []
    for (decay, gen), params in groups.items():
        mult = cfg.optim.gen_lr_mult if gen else 1.0
        out.append({"params": params, "weight_decay": cfg.optim.weight_decay if decay else 0.0,
                    "lr": cfg.optim.lr * mult, "lr_mult": mult})
    return out


def lr_factor(step: int, cfg: Config) -> float:
    o = cfg.optim
    if step < o.warmup:
        return (step + 1) / o.warmup
    if o.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - o.warmup) / max(1, cfg.train.steps - o.warmup))
    return o.min_lr_frac + (1 - o.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """EMA of the parameters; buffers (the quantizer's prototypes) and the EMA encoder (already
    an average) copied exactly."""
    pairs = list(zip(ema.named_parameters(), model.parameters()))
    avg = [(ep, mp.detach()) for (name, ep), mp in pairs if not name.startswith("ema_encoder.")]
    torch._foreach_lerp_([e for e, _ in avg], [m for _, m in avg], 1 - decay)
    for (name, ep), mp in pairs:
        if name.startswith("ema_encoder."):
            ep.copy_(mp)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)


class VAEEncoder:
    """The frozen VAE of the vae variants: images -> latents scaled to unit variance."""

    def __init__(self, folder: str, device: torch.device):
        from .vae import load_vae

        self.vae = load_vae(folder).to(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from .vae import encode

        return encode(self.vae, images)


def prepare_run(cfg: Config, out: Path, resume: bool) -> tuple[Config, object]:
    """Folder, tokenizer and vocabulary size of a run; refuses to clobber saved work."""
    out = Path(out)
    has_ckpt = bool(checkpoint.step_dirs(out / "checkpoints"))
    if has_ckpt and not resume:
        raise RunError(f"{out} already holds checkpoints; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = out / "tokenizer"
    if not tok_dir.exists() and distributed.is_main():  # one writer under torchrun
        init_tok = Path(cfg.train.init) / "tokenizer" if cfg.train.init else None
        if init_tok is not None and init_tok.is_dir():
            shutil.copytree(init_tok, tok_dir)
        elif cfg.train.llm:  # the LLM's own tokenizer, our special tokens added
            load_tokenizer(cfg.train.llm).save(tok_dir)
        else:
            build_world_tokenizer(tok_dir)
    distributed.barrier()
    tok = load_tokenizer(tok_dir)
    cfg = replace(cfg, model=replace(cfg.model, vocab_size=len(tok)))
    return pretrained.resolve(cfg, tok), tok  # architecture of train.llm / train.vision / a diffusers VAE


def init_weights_from(model: RFModel, path: str) -> dict:
    """Start from another run's EMA weights (a vlm run for the generation variants)."""
    try:
        state, _ = checkpoint.load(Path(path))
    except checkpoint.CheckpointError as e:
        raise RunError(f"--init: {e}") from None
    return model.init_from_vlm(state["ema"])


def train(cfg: Config, out: str | Path, resume: bool = False, progress: bool = True,
          minutes: float | None = None, device: str | None = None) -> dict:
    """Train a run to cfg.train.steps (or until `minutes` of wall time), checkpointing on the way.

    SIGTERM or SIGINT stops the run at the end of the current step: it saves a checkpoint there and raises
    Stopped, so a preempted job loses no finished step and `--resume` continues it.

    Returns a summary: final step, last logged losses, wall time, tokens/s."""
    out = Path(out)
    validate(cfg)
    rt = distributed.setup(device or cfg.train.device)  # torchrun's env -> process group; else one process
    cfg, tok = prepare_run(cfg, out, resume)
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    dev = rt.device
    torch.manual_seed(t.seed)
    init = (lambda m: init_weights_from(m, t.init)) if t.init and not resume else None
    model, ema, init_report = distributed.build(cfg, dev, init, fresh=not resume)  # sharded when world > 1
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.optim.lr, betas=cfg.optim.betas, fused=False)
    step, spent = 0, {"wall_s": 0.0, "cpu_s": 0.0}  # time of the earlier legs of a resumed run
    if resume:
        dirs = checkpoint.step_dirs(out / "checkpoints")
        if dirs and distributed.is_dcp(dirs[-1]):  # sharded: resumes on any number of ranks
            if json.loads((dirs[-1] / "config.json").read_text())["model"] != cfg.to_json()["model"]:
                raise RunError(f"--resume: the model config differs from the one saved in {dirs[-1]}")
            step, dirs = distributed.load(dirs[-1], model, ema, opt)["step"], []
        if dirs and rt.world > 1:
            raise RunError(f"--resume: {dirs[-1]} is a single-process checkpoint; start a sharded run from it "
                           "with --init")
        if dirs:
            state, saved = checkpoint.load(dirs[-1])
            if saved["model"] != cfg.to_json()["model"]:
                raise RunError(f"--resume: the model config differs from the one saved in {dirs[-1]}")
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["optim"])
            torch.set_rng_state(state["rng"])
            step = state["step"]
            spent = state.get("clock", spent)
    if rt.is_main:
        (out / "config.json").write_text(json.dumps(cfg.to_json(), indent=1))
    stream = datasources.make_stream(cfg, tok, layout_of(cfg.model))  # the worlds, or real data (data.world=mix)
    vae = VAEEncoder(t.vae, dev) if cfg.model.variant.startswith("vae") else None
    log = distributed.main_file(out / "log.jsonl")  # rank 0 writes, the others write nowhere
    if init_report is not None and step == 0:
        log.write(json.dumps({"init": t.init, **{k: len(v) for k, v in init_report.items()}}) + "\n")

    def save():
        if rt.world > 1:  # sharded step folder (distributed.py), EMA exported as one safetensors file
            distributed.save(out / "checkpoints", step, model, ema, opt, cfg.to_json(), keep=t.keep)
            return
        state = {"model": model.state_dict(), "ema": ema.state_dict(), "optim": opt.state_dict(),
                 "step": step, "rng": torch.get_rng_state(), "clock": clock()}
        checkpoint.save(out / "checkpoints", step, state, cfg.to_json(), weights=ema.state_dict(), keep=t.keep)

    start_time, start_cpu, last = time.time(), time.process_time(), {}

    def clock() -> dict:  # wall and process CPU seconds over every leg; CPU time does not count a SIGSTOP pause
        return {"wall_s": spent["wall_s"] + time.time() - start_time,
                "cpu_s": spent["cpu_s"] + time.process_time() - start_cpu}

    tokens_seen, window_t, window_tok = 0, time.time(), 0
    bar = tqdm(total=t.steps, initial=step, disable=not progress or not rt.is_main, desc=f"{cfg.model.variant}",
               dynamic_ncols=True)
    model.train()
    stopped = False
    with stop_on_signals() as got:
        while step < t.steps:
            if minutes is not None and time.time() - start_time > minutes * 60:
                break
            t0 = time.time()
            batch = distributed.local_batch(stream, step, t.batch_size, t.seed, dev)  # this rank's share
            if vae is not None and batch["is_gen"].any():
                batch["gen_x"] = vae(batch["images"])
            for g in opt.param_groups:
                g["lr"] = cfg.optim.lr * g["lr_mult"] * lr_factor(step, cfg)
            with autocast(t.precision, dev):
                losses = model(batch)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            gnorm = distributed.clip_grad_norm_(model.parameters(), cfg.optim.clip)
            opt.step()
            model.update_ema_encoder()
            ema_update(ema, model, min(t.ema, (1 + step) / (10 + step)))  # warmup: early weights fade fast
            step += 1
            n_tok = int((batch["kind"] != 0).sum())
            tokens_seen += n_tok
            window_tok += n_tok
            bar.update(1)
            if step % t.log_every == 0 or step == t.steps:
                now = time.time()
                row = {"step": step, "lr": opt.param_groups[0]["lr"] / opt.param_groups[0]["lr_mult"],
                       "grad_norm": float(gnorm), "step_time": now - t0, "tokens_per_s": window_tok / (now - window_t)}
                row.update(distributed.mean_over_ranks(losses))
                row.update(getattr(stream, "log_stats", dict)())  # real data: samples skipped, per reason
                log.write(json.dumps(row) + "\n")
                log.flush()
                window_t, window_tok = now, 0
                last = row
                bar.set_postfix({k.replace("loss_", ""): f"{v:.3f}" for k, v in row.items()
                                 if k.startswith("loss")} | {"tok/s": f"{row['tokens_per_s']:.0f}"})
            stopped = distributed.any_rank(got[0] is not None, dev)  # every rank stops at the same step
            if stopped:
                break  # saved below
            if step % t.ckpt_every == 0 and step < t.steps:
                save()
    bar.close()
    save()
    log.close()
    if stopped:
        name = signal.Signals(got[0]).name if got[0] is not None else "a signal on another rank"
        raise Stopped(f"stopped by {name} at step {step} of {t.steps}; checkpoint saved in {out / 'checkpoints'}; "
                      f"continue with: repforce train --out {out} --resume", got[0] or signal.SIGTERM)
    wall = time.time() - start_time
    return {"step": step, **clock(), "threads": torch.get_num_threads(), "tokens_per_s": tokens_seen / max(wall, 1e-9),
            "last": last, "run": str(out)}


def load_run_config(out: Path) -> Config:
    path = Path(out) / "config.json"
    if not path.exists():
        raise RunError(f"--resume: no config.json in {out}")
    return Config.from_json(json.loads(path.read_text()))


__all__ = ["train", "load_run_config", "RunError", "Stopped", "ConfigError", "lr_factor", "param_groups", "ema_update"]
