"""The `repforce` command line.

    repforce world preview --n 16 --out runs/preview
    repforce world truth --out runs/truth
    repforce eval shapes --images runs/truth
    repforce train-vae --out runs/vae
    repforce train --preset shapes --variant vlm --out runs/vlm
    repforce train --preset shapes --variant pixel_rf --init runs/vlm --out runs/pixel_rf
    repforce serve --ckpt shapes --port 7860
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from . import checkpoint  # noqa: E402
from . import engine as E  # noqa: E402
from . import exports  # noqa: E402
from .config import ConfigError, override, validate  # noqa: E402
from .engine import GenOptions  # noqa: E402
from .presets import preset  # noqa: E402
from .pretrained import PretrainedError  # noqa: E402
from .runtime import is_main  # noqa: E402
from .serve import Limits, serve  # noqa: E402
from .study.ablation import BUDGETS, StudyError, ablation, folder_name  # noqa: E402
from .study.demo import demo  # noqa: E402
from .study.evaluate import captions, fashion, vqa, write_shapeseval  # noqa: E402
from .study.report import loss_figure  # noqa: E402
from .study.results import write_results_md  # noqa: E402
from .train import RunError, load_run_config, train, train_vae  # noqa: E402
from .worlds import encoders, shapes, shapeseval  # noqa: E402
from .worlds import fashion as fm  # noqa: E402


class UserError(Exception):
    """Bad input from the user: printed as one line, no traceback."""


def cmd_world_preview(args) -> None:
    if args.n < 1:
        raise UserError("--n must be at least 1")
    scenes = shapes.scenes(args.split, args.start, args.n, args.canvas)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cols = min(4, args.n)
    rows = (args.n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, scene in zip(axes.flat, scenes):
        ax.imshow(shapes.render(scene), interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(shapes.caption(scene), 30)), fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "preview.png", dpi=110)
    plt.close(fig)
    records = [dict(scene.to_json(), caption=shapes.caption(scene),
                    qa=[{"q": q, "a": a} for q, a in shapes.questions(scene)]) for scene in scenes]
    (out / "scenes.json").write_text(json.dumps(records, indent=1))
    print(f"wrote {out / 'preview.png'} and {out / 'scenes.json'} ({args.n} {args.split} scenes, {args.canvas}px)")


def cmd_world_truth(args) -> None:
    shapeseval.write_truth(Path(args.out), args.n, args.canvas)
    print(f"wrote ground-truth renders of {len(shapeseval.prompts())} prompts x {args.n} to {args.out}")


def cmd_eval_shapes(args) -> None:
    try:
        report = shapeseval.evaluate(Path(args.images), args.n, args.canvas, args.per_category)
    except (shapeseval.EvalError, ValueError) as e:
        raise UserError(str(e)) from None
    out = Path(args.out) if args.out else Path(args.images) / "results.json"
    out.write_text(json.dumps(report.to_json(), indent=1))
    for kind, paths in report.problems.items():
        shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        print(f"warning: {len(paths)} {kind.replace('_', ' ')}: {shown}", file=sys.stderr)
    print(f"ShapesEval ({shapeseval.PROMPTS_VERSION}, {report.expected} images)")
    for cat, score in report.scores.items():
        print(f"  {cat:<14} {score:.4f}")
    if report.complete:
        print(f"complete; per-image verdicts in {out}")
    else:
        bad = sum(len(v) for k, v in report.problems.items() if k != "extra")
        print(f"INCOMPLETE: {bad} of {report.expected} images could not be judged and count as failures; "
              f"details in {out}")
        if args.strict:
            raise UserError("incomplete image folder (--strict)")


def cmd_train(args) -> None:
    try:
        if args.resume:
            cfg = load_run_config(Path(args.out))
        else:
            cfg = preset(args.preset, args.variant)
        sets = list(args.set)
        for flag, key in (("steps", "train.steps"), ("batch_size", "train.batch_size"), ("seed", "train.seed"),
                          ("init", "train.init"), ("vae", "train.vae"), ("threads", "train.threads")):
            if getattr(args, flag) is not None:
                sets.append(f"{key}={getattr(args, flag)}")
        cfg = validate(override(cfg, sets))
        if cfg.train.init and not Path(cfg.train.init).exists():
            if not checkpoint.resolve(cfg.train.init).exists():
                shipped = ", ".join(checkpoint.shipped()) or "none"
                raise UserError(f"--init: no such run folder or shipped model: {cfg.train.init} (shipped: {shipped})")
            cfg = override(cfg, [f"train.init={checkpoint.resolve(cfg.train.init)}"])  # a shipped stage, e.g. shapes_vlm
        summary = train(cfg, Path(args.out), resume=args.resume, progress=not args.quiet, minutes=args.minutes)
    except (ConfigError, RunError, PretrainedError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    if not is_main():
        return
    last = summary["last"]
    terms = " ".join(f"{k}={v:.4f}" for k, v in last.items() if k.startswith("loss"))
    print(f"trained {cfg.model.variant} to step {summary['step']} in {summary['wall_s']:.0f}s "
          f"({summary['tokens_per_s']:.0f} tokens/s): {terms}; run folder {args.out}")


def cmd_train_vae(args) -> None:
    if args.steps < 1:
        raise UserError(f"--steps={args.steps}: must be >= 1")
    meta = train_vae(args.out, steps=args.steps, batch_size=args.batch_size, canvas=args.canvas, seed=args.seed,
                     progress=not args.quiet)
    print(f"VAE trained in {meta['wall_s']:.0f}s: held-out PSNR {meta['psnr_db']:.1f} dB, "
          f"latent scale {meta['scaling_factor']:.3f}; saved to {args.out}")


def cmd_pretrain_encoder(args) -> None:
    if args.world != "shapes":
        raise UserError(f"--world={args.world!r}: only the shapes world has a pretraining recipe so far")
    if args.steps < 1:
        raise UserError(f"--steps={args.steps}: must be >= 1")
    meta = encoders.pretrain(args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                             progress=not args.quiet)
    p = meta["probe_heldout"]
    print(f"{meta['version']} trained in {meta['train_wall_s']:.0f}s; linear probe on held-out cells: color "
          f"{p['color']:.3f}, shape {p['shape']:.3f}; saved to {args.out}")


def cmd_export(args) -> None:
    try:
        extra = json.loads(args.meta) if args.meta else {}
    except json.JSONDecodeError as e:
        raise UserError(f"--meta: not JSON ({e})") from None
    try:
        meta = checkpoint.export_model(args.ckpt, Path(args.out), args.name or Path(args.out).name, args.version, extra)
    except checkpoint.CheckpointError as e:
        raise UserError(str(e)) from None
    size = (Path(args.out) / "model.safetensors").stat().st_size / 2**20
    print(f"exported {args.ckpt} (step {meta['step']}) to {args.out}: {size:.1f} MB fp16, sha256 {meta['sha256'][:12]}...")


def _need_fashion() -> None:
    """Stop with the loader's one-line message (it names the Debian package) if Fashion-MNIST is missing."""
    try:
        fm.load_split("train")
        fm.load_split("test")
    except fm.FashionDataError as e:
        raise UserError(str(e)) from None


def _engine(args):
    try:
        return E.load(args.ckpt, ema=not args.raw_weights, precision=getattr(args, "precision", "auto"))
    except E.InferenceError as e:
        raise UserError(str(e)) from None


def _gen_options(args):
    try:
        interval = tuple(float(x) for x in args.interval.split(","))
    except ValueError:
        interval = ()
    if len(interval) != 2:
        raise UserError(f"--interval={args.interval!r}: expected two numbers lo,hi")
    return GenOptions(steps=args.steps, solver=args.solver, shift=args.shift, cfg=args.cfg, interval=interval,
                      rep_cfg=args.rep_cfg, rep_temperature=args.temperature, rep_top_k=args.top_k)


def _export(eng, args, bench: list[exports.Prompt], opts) -> None:
    """--prompts geneval | dpg: the benchmark's own folder layout (repforce.exports)."""
    out = Path(args.out)
    if args.prompts == "geneval":
        exports.write_geneval(eng, bench, out, args.n, opts, args.seed)
        print(f"wrote GenEval images to {out}; score them with geneval's python evaluation/evaluate_images.py "
              f"{out} --outfile {out}/results.jsonl --model-path DETECTOR_FOLDER")
    else:
        exports.write_dpg(eng, bench, out, args.n, opts, args.seed)
        print(f"wrote DPG-Bench images to {out}; score them with ELLA's "
              f"PIC_NUM={args.n} bash dpg_bench/dist_eval.sh {out} {eng.cfg.image_size}")


def cmd_generate(args) -> None:
    if bool(args.prompt) == bool(args.prompts):
        raise UserError("give --prompt TEXT (repeatable) or --prompts shapeseval|geneval|dpg")
    if args.prompts and args.prompts not in ("shapeseval", "geneval", "dpg"):
        raise UserError(f"--prompts={args.prompts!r}: the prompt sets are shapeseval, geneval and dpg")
    if bool(args.metadata) != (args.prompts in ("geneval", "dpg")):
        raise UserError("--metadata FILE goes with --prompts geneval or dpg, and only with them")
    if args.n < 1:
        raise UserError(f"--n={args.n}: must be >= 1")
    if args.prompts == "dpg" and args.n > exports.DPG_MAX_SAMPLES:
        raise UserError(f"--n={args.n}: DPG-Bench takes 1 to {exports.DPG_MAX_SAMPLES} images per prompt")
    bench = None  # the benchmark's prompts, read before the model loads so that a bad file fails at once
    try:
        if args.prompts == "geneval":
            bench = exports.read_geneval(args.metadata)
        elif args.prompts == "dpg":
            bench = exports.read_dpg(args.metadata)
    except exports.ExportError as e:
        raise UserError(str(e)) from None
    eng = _engine(args)
    out = Path(args.out)
    try:
        opts = _gen_options(args)
        if bench:
            _export(eng, args, bench, opts)
            return
        if args.prompts:
            write_shapeseval(eng, out, args.n, opts, args.seed, args.per_category)
            print(f"wrote ShapesEval images to {out}; score them with: repforce eval shapes --images {out} --n {args.n}"
                  + (f" --per-category {args.per_category}" if args.per_category != 60 else ""))
            return
        arr, _ = eng.generate_arrays(args.prompt, args.n, args.seed, opts, progress=True)
    except (E.InferenceError, exports.ExportError) as e:
        raise UserError(str(e)) from None
    out.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arr):
        Image.fromarray(a).save(out / f"{i // args.n:03d}_{i % args.n:02d}.png")
    (out / "prompts.json").write_text(json.dumps(args.prompt, indent=1))
    print(f"wrote {len(arr)} images to {out}")


def cmd_answer(args) -> None:
    if not args.caption and not args.question:
        raise UserError("give --question TEXT or --caption")
    eng = _engine(args)
    try:
        if args.caption:
            print(eng.caption([args.image])[0])
        else:
            print(eng.answer([args.image], [args.question])[0])
    except E.InferenceError as e:
        raise UserError(str(e)) from None


def cmd_serve(args) -> None:

    if not 1 <= args.port <= 65535:
        raise UserError(f"--port={args.port}: must be in 1..65535")
    if args.max_batch < 1 or args.max_queue < args.max_batch or args.max_wait_ms < 0:
        raise UserError("need --max-batch >= 1, --max-queue >= --max-batch and --max-wait-ms >= 0")
    if args.ckpt not in checkpoint.shipped() and not Path(args.ckpt).exists():
        raise UserError(f"--ckpt: no such run folder or shipped model: {args.ckpt} "
                        f"(shipped: {', '.join(checkpoint.shipped()) or 'none'})")
    limits = Limits(max_batch=args.max_batch, max_wait=args.max_wait_ms / 1000, max_queue=args.max_queue,
                    max_n=min(16, args.max_batch))
    try:
        serve(args.ckpt, args.host, args.port, args.api_key, args.app, limits)
    except E.InferenceError as e:
        raise UserError(str(e)) from None
    except OSError as e:  # the port is taken, or the address is not this machine's
        raise UserError(f"cannot serve on {args.host}:{args.port}: {e.strerror or e}") from None
    except ImportError as e:
        raise UserError(f"repforce serve needs {e.name}: pip install 'repforce[serve]'") from None


def cmd_demo(args) -> None:
    try:
        s = demo(args.out, args.minutes, args.preset, args.seed, args.per_category, progress=not args.quiet,
                 overrides=args.set, stage1=args.stage1)
    except (RunError, ConfigError) as e:
        raise UserError(str(e)) from None
    sc = s["shapeseval"]
    first = f"vlm {s['steps']['vlm']} steps" if s["stage1"] == "train" else f"from the shipped {s['stage1']}"
    print(f"\ndemo done in {s['wall_s'] / 60:.1f} min ({first}, pixel_rf {s['steps']['pixel_rf']} steps)")
    print("ShapesEval " + " ".join(f"{k}={v:.2f}" for k, v in sc.items()))
    print("  without guidance " + " ".join(f"{k}={v:.2f}" for k, v in s["shapeseval_unguided"].items()))
    print(f"VQA accuracy {s['vqa']:.3f}, caption exact match {s['caption_exact_match']:.3f}")
    print(f"report: {s['report']}")


def cmd_study(args) -> None:
    if args.budget not in BUDGETS:
        raise UserError(f"--budget={args.budget!r}: must be one of {tuple(BUDGETS)}")
    if args.what == "ablation":
        if args.world == "fashion":
            _need_fashion()
        try:
            done = ablation(args.budget, args.runs, args.results, progress=not args.quiet, only=args.only,
                            world=args.world, extra=args.extra)
        except StudyError as e:
            raise UserError(str(e)) from None
        print(f"{len(done)} variant runs recorded in {args.results}/{folder_name(args.budget, args.world)}")
    out = write_results_md(Path(args.results), Path(args.results).parent / "RESULTS.md")
    print(f"wrote {out}")


def cmd_fashion_judge(args) -> None:
    out = args.out or (fm.PAIR_JUDGE_DIR if args.item else fm.JUDGE_DIR)
    try:
        meta = fm.train_judge(out, args.root, epochs=args.epochs, progress=not args.quiet, item=args.item)
    except fm.FashionDataError as e:
        raise UserError(str(e)) from None
    print(f"judge {meta['version']}: test accuracy {meta['test_accuracy']:.4f}, sha256 {meta['sha256'][:16]}...; "
          f"saved to {out}")


def cmd_eval_vqa(args) -> None:
    eng = _engine(args)
    r = vqa(eng, args.n)
    print(f"VQA accuracy {r['accuracy']:.3f} on {r['n']} held-out questions: "
          + ", ".join(f"{k} {v:.2f}" for k, v in r["by_kind"].items()))
    if args.captions:
        c = captions(eng, args.captions)
        print(f"caption exact match {c['exact_match']:.3f} on {c['n']} held-out scenes")


def cmd_eval_fashion(args) -> None:
    eng = _engine(args)
    try:
        scores, _, _ = fashion(eng, args.n, seed=args.seed, vqa_n=args.vqa_n, root=args.root, n_pairs=args.pairs)
    except fm.FashionDataError as e:
        raise UserError(str(e)) from None
    print(json.dumps(scores, indent=1))


def cmd_plot(args) -> None:
    runs = {Path(r).name: Path(r) for r in args.runs}
    missing = [r for r in runs.values() if not (r / "log.jsonl").exists()]
    if missing:
        raise UserError(f"no log.jsonl in {missing[0]}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    loss_figure(runs).savefig(out, dpi=110, bbox_inches="tight")
    print(f"wrote {out}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="repforce", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    w = sub.add_parser("world", help="the shapes world").add_subparsers(dest="what", required=True)
    pv = w.add_parser("preview", help="a PNG grid of scenes with captions, and their JSON")
    pv.add_argument("--n", type=int, default=16)
    pv.add_argument("--out", required=True)
    pv.add_argument("--canvas", type=int, default=32, choices=(32, 64))
    pv.add_argument("--split", default="train", choices=("train", "heldout"))
    pv.add_argument("--start", type=int, default=0, help="index of the first scene in the stream")
    pv.set_defaults(func=cmd_world_preview)
    tr = w.add_parser("truth", help="ground-truth renders of the ShapesEval prompts, in the eval layout")
    tr.add_argument("--out", required=True)
    tr.add_argument("--n", type=int, default=4, help="images per prompt")
    tr.add_argument("--canvas", type=int, default=32, choices=(32, 64))
    tr.set_defaults(func=cmd_world_truth)

    e = sub.add_parser("eval", help="evaluations").add_subparsers(dest="what", required=True)
    es = e.add_parser("shapes", help="score a folder of generated images with ShapesEval")
    es.add_argument("--images", required=True)
    es.add_argument("--n", type=int, default=4, help="images per prompt expected")
    es.add_argument("--canvas", type=int, default=32)
    es.add_argument("--out", help="results JSON (default: IMAGES/results.json)")
    es.add_argument("--strict", action="store_true", help="exit non-zero when any image is missing or unusable")
    es.add_argument("--per-category", dest="per_category", type=int, default=60, help="score the first k prompts per category")
    es.set_defaults(func=cmd_eval_shapes)
    ev = e.add_parser("vqa", help="VQA accuracy (and caption exact match) on held-out shapes-world scenes")
    ev.add_argument("--ckpt", required=True)
    ev.add_argument("--n", type=int, default=300, help="held-out questions")
    ev.add_argument("--captions", type=int, default=0, help="also caption this many held-out scenes")
    ev.add_argument("--raw-weights", dest="raw_weights", action="store_true")
    ev.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                    help="auto: bf16 where this CPU's bf16 matmuls are fast; fp32 for figures comparable across hosts")
    ev.set_defaults(func=cmd_eval_vqa)

    ef = e.add_parser("fashion", help="class accuracy, Frechet distance (judge features) and VQA on Fashion-MNIST")
    ef.add_argument("--ckpt", required=True)
    ef.add_argument("--n", type=int, default=20, help="images per class prompt")
    ef.add_argument("--vqa-n", dest="vqa_n", type=int, default=500)
    ef.add_argument("--seed", type=int, default=0)
    ef.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    ef.add_argument("--pairs", type=int, default=0,
                    help="also score this many two-item prompts ('a bag to the left of a sandal'), 4 images each")
    ef.add_argument("--raw-weights", dest="raw_weights", action="store_true")
    ef.set_defaults(func=cmd_eval_fashion)

    t = sub.add_parser("train", help="train a model (any variant)")
    t.add_argument("--preset", default="shapes", help="tiny | shapes | shapes_v3 | shapes_v2 | shapes_v1 | scale_* (repforce.presets)")
    t.add_argument("--variant", default="pixel_rf", help="vlm | pixel | pixel_rf | vae | vae_rf | pixel_repa | pixel_cont")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--steps", type=int)
    t.add_argument("--batch-size", dest="batch_size", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--init", help="start from this run's EMA weights (e.g. runs/vlm)")
    t.add_argument("--vae", help="vae variants: folder of `repforce train-vae`")
    t.add_argument("--threads", type=int)
    t.add_argument("--minutes", type=float, help="stop (and checkpoint) after this much wall time")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field, e.g. --set model.dim=128 (repeatable)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="draw images from prompts")
    g.add_argument("--ckpt", required=True, help="run folder or checkpoint folder")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--prompts", help="a prompt set, written in its benchmark's layout: shapeseval, geneval or dpg")
    g.add_argument("--metadata", help="geneval: its evaluation_metadata.jsonl; dpg: its prompts folder or dpg_bench.csv")
    g.add_argument("--n", type=int, default=4, help="images per prompt")
    g.add_argument("--out", required=True)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=25, help="ODE steps")
    g.add_argument("--solver", default="euler", choices=("euler", "heun"))
    g.add_argument("--shift", type=float, help="timestep shift (default: flow.resolution_shift, 1 at 32 px)")
    g.add_argument("--cfg", type=float, default=3.0, help="pixel guidance weight")
    g.add_argument("--interval", default="0,1", help="guidance interval lo,hi in t")
    g.add_argument("--rep-cfg", dest="rep_cfg", type=float, default=2.0, help="rep-token guidance weight")
    g.add_argument("--temperature", type=float, default=1.0, help="rep-token temperature")
    g.add_argument("--top-k", dest="top_k", type=int, default=0, help="rep-token top-k (0 = all)")
    g.add_argument("--per-category", dest="per_category", type=int, default=60, help="shapeseval: first k prompts per category")
    g.add_argument("--raw-weights", dest="raw_weights", action="store_true", help="sample from the raw weights, not the EMA")
    g.set_defaults(func=cmd_generate)

    an = sub.add_parser("answer", help="answer a question about an image (or caption it)")
    an.add_argument("--ckpt", required=True)
    an.add_argument("--image", required=True)
    an.add_argument("--question")
    an.add_argument("--caption", action="store_true")
    an.add_argument("--raw-weights", dest="raw_weights", action="store_true")
    an.set_defaults(func=cmd_answer)

    sv = sub.add_parser("serve", help="a web app and an OpenAI-compatible API over one model, on one port")
    sv.add_argument("--ckpt", default="shapes", help="a shipped model (default: shapes) or a run folder")
    sv.add_argument("--host", default="127.0.0.1", help="the address to bind (default: this machine only)")
    sv.add_argument("--port", type=int, default=7860)
    sv.add_argument("--api-key", dest="api_key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    sv.add_argument("--no-app", dest="app", action="store_false", help="the API only, no web app")
    sv.add_argument("--max-batch", dest="max_batch", type=int, default=64, help="images (or answers) per sampling batch")
    sv.add_argument("--max-wait-ms", dest="max_wait_ms", type=float, default=50.0,
                    help="how long a batch waits for more requests")
    sv.add_argument("--max-queue", dest="max_queue", type=int, default=512,
                    help="images waiting before requests get 503")
    sv.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="train pixel_rf (after a vlm stage) in bounded time and write report.html")
    d.add_argument("--minutes", type=float, default=10.0, help="wall-time budget, training and evaluation together")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--preset", default="shapes")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--per-category", dest="per_category", type=int, default=10, help="ShapesEval prompts per category")
    d.add_argument("--stage1", default=None, help="where pixel_rf starts: a shipped model or run folder, or 'train' "
                   "to train the vlm stage in the budget (default: the preset's shipped stage 1, shapes_vlm)")
    d.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)

    fj = sub.add_parser("fashion", help="Fashion-MNIST world").add_subparsers(dest="what", required=True)
    jd = fj.add_parser("judge", help="train the judge classifier on the train split")
    jd.add_argument("--out", default="", help="default: the package's assets/fashion_judge (fashion_pair_judge)")
    jd.add_argument("--item", type=int, default=0,
                    help="train the pair judge: items shrunk to ITEM px as in composites (16 on the 32 px canvas)")
    jd.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    jd.add_argument("--epochs", type=int, default=6)
    jd.add_argument("--quiet", action="store_true")
    jd.set_defaults(func=cmd_fashion_judge)

    pl = sub.add_parser("plot", help="loss curves of runs (one panel per term) as a PNG")
    pl.add_argument("runs", nargs="+")
    pl.add_argument("--out", required=True)
    pl.set_defaults(func=cmd_plot)

    st = sub.add_parser("study", help="the paper's ablation on the shapes world or Fashion-MNIST (resumable)")
    st.add_argument("what", choices=("ablation", "report"))
    st.add_argument("--budget", default="quick", help="quick (< 30 min) or full (hours)")
    st.add_argument("--runs", default="runs/study", help="where the run folders go")
    st.add_argument("--results", default="docs/results", help="where the result JSONs go (checked in)")
    st.add_argument("--only", nargs="+", help="run only these runs (names as in the plan, or vlm / vae): for "
                    "workers side by side; the shared vlm and VAE must be named or already recorded")
    st.add_argument("--extra", nargs="+", help="other seeds of planned runs, outside the plan (pixel_rf_K64_s1): "
                    "recorded beside them and averaged into their rows; alone, they run nothing else")
    st.add_argument("--world", default="shapes", choices=("shapes", "fashion"), help="which world the study runs on")
    st.add_argument("--quiet", action="store_true")
    st.set_defaults(func=cmd_study)

    pe = sub.add_parser("pretrain-encoder", help="pretrain a world encoder (the small worlds' DINOv3)")
    pe.add_argument("--world", default="shapes", choices=("shapes", "fashion"))
    pe.add_argument("--out", required=True, help="folder (src/repforce/assets/shapes_encoder is the shipped one)")
    pe.add_argument("--steps", type=int, default=2000)
    pe.add_argument("--batch-size", dest="batch_size", type=int, default=64)
    pe.add_argument("--seed", type=int, default=0)
    pe.add_argument("--quiet", action="store_true")
    pe.set_defaults(func=cmd_pretrain_encoder)

    ex = sub.add_parser("export", help="a run's EMA weights as a self-contained model folder (fp16, sha256-checked)")
    ex.add_argument("--ckpt", required=True, help="run folder or checkpoint")
    ex.add_argument("--out", required=True, help="folder (src/repforce/assets/shapes is the shipped `shapes` model)")
    ex.add_argument("--name", default="", help="model name (default: the folder's name)")
    ex.add_argument("--version", default="1")
    ex.add_argument("--meta", default="", help="JSON object of more fields for model.json (scores, commands)")
    ex.set_defaults(func=cmd_export)

    v = sub.add_parser("train-vae", help="train the frozen VAE of the vae variants")
    v.add_argument("--out", required=True)
    v.add_argument("--steps", type=int, default=2000)
    v.add_argument("--batch-size", dest="batch_size", type=int, default=32)
    v.add_argument("--canvas", type=int, default=32)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--quiet", action="store_true")
    v.set_defaults(func=cmd_train_vae)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"repforce: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # train.Stopped says where it saved and how to go on
        print(f"repforce: {e or 'interrupted'}", file=sys.stderr)
        return getattr(e, "code", 130)
    return 0


if __name__ == "__main__":
    sys.exit(main())
