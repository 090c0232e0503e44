"""The ablation study of the paper's Table 3 on the shapes world, resumable run by run.

    repforce study ablation --budget quick      # under 30 minutes on 2 CPU cores, wide error bars
    repforce study ablation --budget full       # hours; rerun the same command to continue
    repforce study ablation --budget quick --world fashion   # the same on Fashion-MNIST
    repforce study ablation --budget full --extra pixel_rf_K64_s1   # another seed of a planned run
    repforce study report                       # rebuild docs/RESULTS.md from docs/results/*/*.json

Protocol (docs/DESIGN.md): one `vlm` run shared by every variant, one VAE for the `vae`
variants (its cost reported apart), then every variant from the same vlm weights with
the same data, steps and batch. The four main variants run with several seeds; REPA,
continuous tokens and the codebook sweep with one, unless the budget seeds them too (the
full budget runs pixel_cont at every seed); `--extra` adds seeds to any of them outside the
plan, averaged into its row of the tables. Each finished run writes
docs/results/<name>.json (scores, curves, config, git commit, wall time); a rerun skips
what is there, so the study survives being stopped at any point.

Worlds: on `shapes` each run is scored by ShapesEval and held-out VQA; on `fashion`
(Fashion-MNIST) by the learned judge's class accuracy and Frechet distance of n images per
class prompt, and VQA ("what is this?") on the test split. Results of a world other than
shapes go to docs/results/<world>_<budget>/.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import override, validate
from ..engine import GenOptions, load
from ..presets import preset
from ..train import train, train_vae
from ..worlds import shapeseval
from . import evaluate
from .report import read_log

PER_PAIR = 4  # Fashion-MNIST composites: images per two-item prompt
MAIN = ("pixel", "pixel_rf", "vae", "vae_rf")
PAPER = {"pixel": 0.25, "pixel_rf": 0.76, "vae": 0.52, "vae_rf": 0.77, "pixel_repa": 0.43, "pixel_cont": 0.26}


@dataclass(frozen=True)
class Budget:
    vlm_steps: int  # steps of the shared vlm run
    vae_steps: int  # steps of the VAE
    steps: int  # steps of every variant
    batch_size: int  # samples per step, every run
    seeds: tuple[int, ...]  # seeds of the four main variants
    codebooks: tuple[int, ...]  # codebook sizes of the pixel_rf sweep (seed 0)
    per_category: int  # ShapesEval prompts per category
    n: int  # images per prompt
    vqa_n: int  # held-out VQA questions
    n_fashion: int = 20  # Fashion-MNIST: generated images per class prompt
    fashion_pairs: float = 0.0  # Fashion-MNIST: share of two-item composites in training (data.fashion_pairs)
    n_pairs: int = 20  # Fashion-MNIST with composites: two-item prompts scored, PER_PAIR images each
    preset: str = "shapes"
    overrides: tuple[str, ...] = ()
    also_seeded: tuple[str, ...] = ()  # other variants run at every seed too, after the codebook sweep


BUDGETS = {
    # a smaller model so the whole table fits in ~25 minutes on 2 cores (one thread per world when the
    # shapes and fashion studies run side by side)
    "quick": Budget(800, 300, 400, 16, (0, 1, 2), (64, 1024), 5, 2, 100, n_fashion=10, preset="shapes_v1",
                    overrides=("model.dim=128", "model.n_layers=3", "model.ffn_hidden=352", "model.enc_dim=96",
                               "model.enc_layers=2", "model.head_dim=32", "optim.warmup=30",
                               "model.encoder_ema=0.9999")),  # as when its results were recorded
    # pixel_cont at every seed: on seed 0 it beat pixel_rf by 1.5 judging standard errors, against the paper
    "full": Budget(2000, 2000, 2000, 32, (0, 1, 2), (64, 1024), 20, 4, 300, fashion_pairs=0.2, preset="shapes_v1",
                   also_seeded=("pixel_cont",)),
}


class StudyError(ValueError):
    """A study asked for that cannot run as asked (an unknown world or run name, a missing shared run)."""


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def plan(b: Budget) -> list[dict]:
    """Every variant run of the study: name, variant, seed and extra overrides."""
    one = lambda v, s: {"name": f"{v}_s{s}", "variant": v, "seed": s, "sets": []}  # noqa: E731
    # seed-major, so a study stopped part-way already has one seed of every variant
    runs = [one(v, b.seeds[0]) for v in (*MAIN, "pixel_repa", "pixel_cont")]
    runs += [one(v, s) for s in b.seeds[1:] for v in MAIN]
    runs += [{"name": f"pixel_rf_K{k}_s0", "variant": "pixel_rf", "seed": 0, "sets": [f"model.codebook_size={k}"]}
             for k in b.codebooks]
    runs += [one(v, s) for s in b.seeds[1:] for v in b.also_seeded]
    return runs


def extra_run(name: str, runs: list[dict]) -> dict:
    """Another seed of a planned run, outside the plan: `<run>_s<seed>` (pixel_rf_K64_s1, pixel_repa_s1). It is
    recorded beside the plan's runs and averaged into its row."""
    stem, _, seed = name.rpartition("_s")
    bases = {s["name"].rpartition("_s")[0]: s for s in runs}
    if stem not in bases or not seed.isdigit():
        raise StudyError(f"extra={name!r}: not <run>_s<seed> for a run of the plan ({', '.join(sorted(bases))})")
    if any(s["name"] == name for s in runs):
        raise StudyError(f"extra={name!r}: a run of the plan already; name it with --only")
    return {**bases[stem], "name": name, "seed": int(seed)}


def curves(run: Path, points: int = 60) -> dict[str, list]:
    rows = read_log(run)
    keep = rows[:: max(1, len(rows) // points)]
    keys = sorted({k for r in rows for k in r if k.startswith("loss") or k in ("rep_ppl", "rep_dead")})
    return {"step": [r["step"] for r in keep], **{k: [r.get(k) for r in keep] for k in keys}}


WORLDS = ("shapes", "fashion")


def folder_name(budget: str, world: str = "shapes") -> str:
    """Results subfolder of a study: the budget for shapes, <world>_<budget> otherwise."""
    return budget if world == "shapes" else f"{world}_{budget}"


def world_sets(world: str, b: Budget) -> list[str]:
    if world == "shapes":
        return []
    return [f"data.world={world}", *([f"data.fashion_pairs={b.fashion_pairs}"] if b.fashion_pairs else [])]


def evaluate_run(eng, b: Budget, out: Path, world: str, progress: bool) -> tuple[dict, dict]:
    """Scores of one trained run and the images of its sample grid (rows of equal length)."""
    if world == "fashion":
        n_pairs = b.n_pairs if b.fashion_pairs else 0
        scores, arr, pairs = evaluate.fashion(eng, b.n_fashion, vqa_n=b.vqa_n, n_pairs=n_pairs, n_per_pair=PER_PAIR)
        per = b.n_fashion
        rows = [list(arr[k * per:(k + 1) * per][:8]) for k in range(len(arr) // per)]  # one row per class
        if pairs is not None:  # two rows of composites: the first image of each of 16 pair prompts
            rows += [list(pairs[::PER_PAIR][:8]), list(pairs[::PER_PAIR][8:16])]
        return {"fashion": {k: v for k, v in scores.items() if k != "vqa"}, "vqa": scores["vqa"]}, rows
    images = evaluate.write_shapeseval(eng, out / "shapeseval", b.n, GenOptions(), 0, b.per_category, progress=progress)
    scored = shapeseval.score_images(images, b.per_category)
    vqa = evaluate.vqa(eng, b.vqa_n)
    plist = shapeseval.prompts(b.per_category)
    rows = [[images[(p.index, 0)] for p in plist if p.category == cat][:8] for cat in shapeseval.CATEGORIES]
    return {"shapeseval": scored.scores, "vqa": vqa["accuracy"], "vqa_by_kind": vqa["by_kind"]}, rows


def run_one(spec: dict, b: Budget, root: Path, results: Path, vlm: Path, vae: Path, progress: bool,
            world: str = "shapes") -> dict:
    out = root / spec["name"]
    sets = [*b.overrides, *world_sets(world, b), f"train.steps={b.steps}", f"train.batch_size={b.batch_size}", f"train.seed={spec['seed']}",
            f"train.init={vlm}", f"train.ckpt_every={max(50, b.steps // 4)}", "train.keep=1", *spec["sets"]]
    if spec["variant"].startswith("vae"):
        sets.append(f"train.vae={vae}")
    cfg = validate(override(preset(b.preset, spec["variant"]), sets))
    resume = out.exists() and (out / "checkpoints").exists()
    summary = train(cfg, out, resume=resume, progress=progress)
    eng = load(out)
    t0 = time.time()
    scores, rows = evaluate_run(eng, b, out, world, progress)
    grid_path = results / "grids" / f"{spec['name']}.png"
    save_grid(rows, grid_path)
    res = {"name": spec["name"], "variant": spec["variant"], "seed": spec["seed"], "sets": spec["sets"], "world": world,
           **scores, "train_wall_s": summary["wall_s"], "train_cpu_s": summary["cpu_s"], "threads": summary["threads"],
           "eval_wall_s": time.time() - t0, "steps": summary["step"],
           "tokens_per_s": summary["tokens_per_s"], "curves": curves(out), "config": cfg.to_json(),
           "commit": git_commit(), "grid": str(grid_path.relative_to(results.parent))}
    (results / f"{spec['name']}.json").write_text(json.dumps(res, indent=1))
    return res


def save_grid(image_rows: list[list[np.ndarray]], path: Path, width: int = 8) -> None:
    """A PNG of rows of images (H, W, 3) uint8, each row padded to `width` with white, 3x nearest upscaled."""

    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for row in image_rows:
        row = list(row[:width]) + [np.full_like(image_rows[0][0], 255)] * (width - len(row[:width]))
        rows.append(np.concatenate([np.pad(r, ((1, 1), (1, 1), (0, 0)), constant_values=255) for r in row], 1))
    Image.fromarray(np.concatenate(rows, 0)).resize((rows[0].shape[1] * 3, len(rows) * rows[0].shape[0] * 3),
                                                    Image.NEAREST).save(path)


def ablation(budget: str = "quick", root: str | Path = "runs/study", results: str | Path = "docs/results",
             progress: bool = True, only: list[str] | None = None, world: str = "shapes",
             extra: list[str] | None = None) -> list[dict]:
    """Train and score the study's runs that are not recorded yet: all of them, or those named in `only` (planned
    runs, vlm, vae) and `extra` (other seeds of planned runs, see extra_run)."""
    b = BUDGETS[budget]
    if world not in WORLDS:
        raise StudyError(f"world={world!r}: must be one of {WORLDS}")
    name = folder_name(budget, world)
    root, results = Path(root) / name, Path(results) / name
    results.mkdir(parents=True, exist_ok=True)
    vlm, vae = root / "vlm", root / "vae"
    runs = plan(b)
    extras = [extra_run(n, runs) for n in extra or []]
    named = [*(only or []), *(s["name"] for s in extras)]
    only = only or ([] if extras else None)  # extra runs alone train nothing else
    specs = [s for s in runs if only is None or s["name"] in only] + extras
    if only is not None:  # workers side by side: each names its runs, and the shared vlm / VAE are trained by one of them
        names = {"vlm", "vae", *(s["name"] for s in runs)}
        if unknown := [n for n in only if n not in names]:
            raise StudyError(f"only={unknown}: not runs of the {budget} study, which has {', '.join(sorted(names))}")
        for shared, users in (("vlm", specs), ("vae", [s for s in specs if s["variant"].startswith("vae")])):
            if users and shared not in only and not (results / f"{shared}.json").exists():
                raise StudyError(f"only={named}: {users[0]['name']} needs the study's {shared}, which is not recorded "
                                 f"yet; name {shared} too, or run it first with --only {shared}")
    if not (results / "vlm.json").exists() and (only is None or "vlm" in only):
        cfg = validate(override(preset(b.preset, "vlm"), [*b.overrides, *world_sets(world, b),
                                                                  f"train.steps={b.vlm_steps}",
                                                                  f"train.batch_size={b.batch_size}"]))
        s = train(cfg, vlm, resume=(vlm / "checkpoints").exists(), progress=progress)
        eng = load(vlm)
        if world == "fashion":
            vqa = {"accuracy": evaluate.fashion_vqa(eng, b.vqa_n), "by_kind": {}}
        else:
            vqa = evaluate.vqa(eng, b.vqa_n)
        (results / "vlm.json").write_text(json.dumps({"name": "vlm", "variant": "vlm", "vqa": vqa["accuracy"],
                                                      "world": world,
                                                      "vqa_by_kind": vqa["by_kind"], "train_wall_s": s["wall_s"],
                                                      "train_cpu_s": s["cpu_s"], "threads": s["threads"],
                                                      "steps": s["step"], "curves": curves(vlm),
                                                      "config": cfg.to_json(), "commit": git_commit()}, indent=1))
    if not (results / "vae.json").exists() and (only is None or "vae" in only):
        data = override(preset(b.preset, "pixel"), world_sets(world, b)).data  # the variants' world
        meta = train_vae(vae, steps=b.vae_steps, batch_size=b.batch_size, progress=progress, data=data)
        (results / "vae.json").write_text(json.dumps({"name": "vae", **meta, "commit": git_commit()}, indent=1))
    done = []
    for spec in specs:
        path = results / f"{spec['name']}.json"
        if path.exists():
            done.append(json.loads(path.read_text()))
            continue
        done.append(run_one(spec, b, root, results, vlm, vae, progress, world))
    return done
