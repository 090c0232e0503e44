"""docs/RESULTS.md from the study's result JSONs: the paper's numbers beside ours.

    repforce study report

Means and spreads are over seeds; a difference smaller than the larger of the two
spreads (one standard deviation) is called a tie, and so is one smaller than the judging
noise: one standard error of the difference of two accuracies, each a mean over n judged
samples treated as independent. With one seed a side there is no spread, and the judging
noise is the only floor. Each verdict states the difference in units of that floor
(`margin`), so a verdict that passes by a hair reads as one.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..worlds.fashion import CLASSES  # noqa: E402
from ..worlds.shapeseval import CATEGORIES  # noqa: E402
from .ablation import BUDGETS, MAIN, PAPER, PER_PAIR, plan  # noqa: E402


def load_results(folder: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))}


def group(results: dict[str, dict], scored: str = "shapeseval") -> dict[str, list[dict]]:
    """Runs by variant (codebook-sweep runs apart, by K), in the tables' order: the main variants, the
    baselines, then the sweep by K; only runs that carry the `scored` scores."""
    out: dict[str, list[dict]] = {}
    for r in results.values():
        if scored not in r:
            continue
        name = r["variant"]
        for s in r.get("sets", []):
            if s.startswith("model.codebook_size="):
                name = f"pixel_rf K={s.split('=')[1]}"
        out.setdefault(name, []).append(r)
    first = (*MAIN, "pixel_repa", "pixel_cont")
    rank = {v: (first.index(v), 0) if v in first else (len(first), int(v.split("=")[1])) for v in out}
    return dict(sorted(out.items(), key=lambda kv: rank[kv[0]]))


def stat(vals: list[float]) -> tuple[float, float]:
    a = np.array(vals, float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def fmt(vals: list[float]) -> str:
    m, s = stat(vals)
    return f"{m:.3f} ± {s:.3f} (n={len(vals)})" if len(vals) > 1 else f"{m:.3f} (n=1)"


TIME_NOTE = ["", "Train CPU s is the process's CPU time over all its threads (recorded since the runs of 2026-11-29); "
             "the wall time also counts waiting for a core while another job shared this 2-core machine, and pauses."]


def cost(rs: list[dict]) -> str:
    """Mean training wall seconds and, where recorded, process CPU seconds (which a paused job does not inflate)."""
    cpu = [r["train_cpu_s"] for r in rs if "train_cpu_s" in r]
    wall = f"{np.mean([r['train_wall_s'] for r in rs]):.0f}"
    if not cpu:
        return f"{wall} | -"
    return f"{wall} | {np.mean(cpu):.0f}" + ("" if len(cpu) == len(rs) else f" ({len(cpu)} of {len(rs)} runs)")


def judging_noise(pa: float, pb: float, n: int) -> float:
    """One standard error of pb - pa, two accuracies each over n independent yes/no judgements."""
    return float(np.sqrt((pa * (1 - pa) + pb * (1 - pb)) / n)) if n else 0.0


def tie_floor(a: list[float], b: list[float], n: int = 0) -> float:
    """The largest difference of means called a tie: the larger spread over seeds, or the judging noise of
    n samples per score (n=0: no judging noise, e.g. for a distance)."""
    (ma, sa), (mb, sb) = stat(a), stat(b)
    # a seed mean averages len(a) scores; its judging noise shrinks with them
    return max(sa, sb, judging_noise(ma, mb, n * min(len(a), len(b))))


def verdict(a: list[float], b: list[float], n: int = 0) -> str:
    """How b compares with a: "tie" when the means differ by no more than the tie floor."""
    ma, mb = stat(a)[0], stat(b)[0]
    if abs(ma - mb) <= tie_floor(a, b, n):
        return "tie"
    return "higher" if mb > ma else "lower"


def margin(a: list[float], b: list[float], n: int) -> str:
    """The difference of means in units of the tie floor, so a reader sees a knife-edge verdict as one."""
    floor = tie_floor(a, b, n)
    return f"; difference {abs(stat(a)[0] - stat(b)[0]) / floor:.1f}x the tie floor" if floor else ""


def said(b: str, a: str, v: str) -> str:
    """A verdict as words: `b` ties with / scores higher than / scores lower than `a`."""
    return f"`{b}` **ties** with `{a}`" if v == "tie" else f"`{b}` scores **{v}** than `{a}`"


def curves_png(results: dict[str, dict], path: Path) -> None:
    runs = [r for r in results.values() if "curves" in r and (r["name"].endswith("_s0") or r["name"] == "vlm")
            and "K" not in r["name"]]
    terms = ["loss_lm", "loss_fm", "loss_rep", "loss_repa", "loss_cont"]
    terms = [t for t in terms if any(t in r["curves"] for r in runs)]
    fig, axes = plt.subplots(1, len(terms), figsize=(3.6 * len(terms), 2.8), squeeze=False)
    for ax, t in zip(axes[0], terms):
        for r in runs:
            if t in r["curves"]:
                ax.plot(r["curves"]["step"], r["curves"][t], label=r["name"], lw=1.1)
        ax.set_title(t)
        if t != "loss_repa":  # REPA's loss is a negative cosine
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def shapes_section(budget: str, folder: Path, rel: str) -> list[str]:
    """The shapes-world study of one budget: Table 3 side by side, claims, sweep, categories, curves, samples."""
    res = load_results(folder)
    g = group(res)
    b = BUDGETS[budget]
    lines = [f"## Shapes world, {budget} budget", "",
             f"Budget: vlm {b.vlm_steps} steps, every variant {b.steps} steps x batch {b.batch_size} from the same vlm "
             f"weights and data; ShapesEval {b.per_category} prompts/category x {b.n} images; VQA {b.vqa_n} held-out "
             f"questions; preset `{b.preset}` with {list(b.overrides) or 'no overrides'}. "
             f"Reproduce: `repforce study ablation --budget {budget}`.", ""]
    lines += ["| variant | paper GenEval | ShapesEval overall | VQA accuracy | train wall s | train CPU s |",
              "|---|---|---|---|---|---|"]
    for v, rs in g.items():
        if v in PAPER:
            lines.append(f"| `{v}` | {PAPER[v]:.2f} | {fmt([r['shapeseval']['overall'] for r in rs])} | "
                         f"{fmt([r['vqa'] for r in rs])} | {cost(rs)} |")
    if "vlm" in res:
        lines.append(f"| `vlm` (stage 1) | - | - | {res['vlm']['vqa']:.3f} | {cost([res['vlm']])} |")
    lines += TIME_NOTE
    if "vae" in res:
        lines += ["", f"The VAE (trained separately, frozen): {res['vae']['steps']} steps in {res['vae']['wall_s']:.0f} s, "
                  f"held-out PSNR {res['vae']['psnr_db']:.1f} dB. This cost is not in the variants' wall time. "
                  f"{res['vae'].get('note', '')}".rstrip()]
    lines += progress(g, b)
    if not g:
        return lines
    lines += ["", f"### The paper's claims, checked ({budget})", ""]
    lines += claims(g, lambda r: r["shapeseval"]["overall"], "ShapesEval", len(CATEGORIES) * b.per_category * b.n,
                    b.vqa_n)
    sweep = {k: v for k, v in g.items() if k.startswith("pixel_rf K=")}
    if sweep:
        rows = [(min(rs, key=lambda r: r["seed"]), "") for rs in sweep.values()] + [(r, " (default)") for r in g.get("pixel_rf", [])
                                                          if r["seed"] == 0]
        scores = [r["shapeseval"]["overall"] for r, _ in rows]
        n = len(CATEGORIES) * b.per_category * b.n
        lines += ["", "Codebook size (pixel_rf, seed 0; one standard error of a difference of two of these scores is "
                  f"about {judging_noise(min(scores), max(scores), n):.3f}):", "",
                  "| K | ShapesEval overall | VQA |", "|---|---|---|"]
        for r, label in sorted(rows, key=lambda row: row[0]["config"]["model"]["codebook_size"]):
            lines.append(f"| {r['config']['model']['codebook_size']}{label} | {r['shapeseval']['overall']:.3f} | "
                         f"{r['vqa']:.3f} |")
    lines += ["", "ShapesEval by category (mean over seeds):", "",
              "| variant | " + " | ".join(CATEGORIES) + " |", "|---|" + "---|" * len(CATEGORIES)]
    for v, rs in g.items():
        lines.append(f"| `{v}` | " + " | ".join(f"{np.mean([r['shapeseval'][c] for r in rs]):.3f}" for c in CATEGORIES)
                     + " |")
    return lines + pictures(res, g, folder, rel, "one row per category, first prompts")


def progress(g: dict[str, list[dict]], b) -> list[str]:
    """A line saying how many of the budget's variant runs are recorded, if not all."""
    planned = {s["name"] for s in plan(b)}  # extra seeds (study.extra_run) are not the plan's
    done, total = sum(r["name"] in planned for v in g.values() for r in v), len(planned)
    if done >= total:
        return []
    return ["", f"**In progress:** {done} of {total} variant runs recorded; rerun the command to continue."]


def claims(g: dict[str, list[dict]], score, what: str, n: int, vqa_n: int = 0) -> list[str]:
    """The paper's claims as verdicts between variants (tie when within one spread or the judging noise of
    n judged images per score), with `g` holding only the runs `score` can read; vqa_n questions per VQA
    score, or 0 to leave understanding out."""
    checks = [("pixel", "pixel_rf", "RF lifts pixel-space generation (paper 0.25 -> 0.76)"),
              ("vae", "vae_rf", "RF on top of a VAE (0.52 -> 0.77)"),
              ("pixel", "vae", "a VAE beats naive pixels (0.25 -> 0.52)"),
              ("vae", "pixel_rf", "pixel+RF reaches the VAE level or above (0.52 vs 0.76)"),
              ("pixel_repa", "pixel_rf", "predicting tokens beats aligning features (REPA 0.43 vs 0.76)"),
              ("pixel_cont", "pixel_rf", "discrete tokens beat continuous ones (0.26 vs 0.76)")]
    lines = []
    for a, bb, claim in checks:
        if a in g and bb in g:
            va, vb = [score(r) for r in g[a]], [score(r) for r in g[bb]]
            seeds = sorted((len(va), len(vb)))
            weak = "" if seeds[0] > 1 else f" One seed {'each' if seeds[1] == 1 else 'on one side'}: indicative only."
            lines.append(f"- {claim}: {said(bb, a, verdict(va, vb, n))} on {what} ({fmt(vb)} vs {fmt(va)}"
                         f"{margin(va, vb, n)}).{weak}")
    if vqa_n and "pixel" in g and "pixel_rf" in g:
        va, vb = [r["vqa"] for r in g["pixel"]], [r["vqa"] for r in g["pixel_rf"]]
        lines.append(f"- RF helps understanding: on VQA {said('pixel_rf', 'pixel', verdict(va, vb, vqa_n))} "
                     f"({fmt(vb)} vs {fmt(va)}{margin(va, vb, vqa_n)}).")
    return lines


def pictures(res: dict, g: dict, folder: Path, rel: str, rows: str) -> list[str]:
    curves_png(res, folder / "curves.png")
    lines = ["", "Loss curves (seed 0):", "", f"![loss curves]({rel}/curves.png)", "",
             f"Samples (seed 0; {rows}):", ""]
    for v, rs in g.items():
        r0 = sorted(rs, key=lambda r: r["seed"])[0]
        lines += [f"`{v}`", "", f"![{v}]({rel}/grids/{Path(r0['grid']).name})", ""]
    return lines


def fashion_section(budget: str, folder: Path, rel: str) -> list[str]:
    """The Fashion-MNIST study of one budget: class accuracy, Frechet distance, VQA per variant."""
    res = load_results(folder)
    g = group(res, scored="fashion")
    b = BUDGETS[budget]
    lines = [f"## Fashion-MNIST, {budget} budget", "",
             f"The same protocol and budget as the shapes study ({b.steps} steps x batch {b.batch_size} per variant, "
             f"vlm {b.vlm_steps} steps), on real 28x28 photos padded to 32x32. Each variant draws {b.n_fashion} images "
             "per class prompt (\"a photo of a sneaker\"); the judge (a small CNN trained on the training split only, "
             "shipped in `src/repforce/assets/fashion_judge` with its hash) gives the class accuracy, and the Frechet "
             "distance between its penultimate features of generated and 2,000 held-out test images (lower is better). "
             "That distance is this world's FID: it is **not** comparable to Inception FID, and with few images per "
             "variant it is biased upward, equally for every variant. VQA: \"what is this?\" on the test split. "
             f"Reproduce: `repforce study ablation --budget {budget} --world fashion`.", "",
             "| variant | class accuracy | Frechet distance | VQA accuracy | train wall s | train CPU s |",
             "|---|---|---|---|---|---|"]
    for v, rs in g.items():
        lines.append(f"| `{v}` | {fmt([r['fashion']['class_accuracy'] for r in rs])} | "
                     f"{fmt([r['fashion']['frechet_distance'] for r in rs])} | {fmt([r['vqa'] for r in rs])} | "
                     f"{cost(rs)} |")
    if "vlm" in res:
        lines.append(f"| `vlm` (stage 1) | - | - | {res['vlm']['vqa']:.3f} | {cost([res['vlm']])} |")
    lines += TIME_NOTE
    if "vae" in res:
        lines += ["", f"The VAE on this world: {res['vae']['steps']} steps in {res['vae']['wall_s']:.0f} s, "
                  f"held-out PSNR {res['vae']['psnr_db']:.1f} dB (not in the variants' wall time)."]
    lines += progress(g, b)
    if not g:
        return lines
    lines += ["", f"### The paper's claims on Fashion-MNIST ({budget}, class accuracy)", ""]
    lines += claims(g, lambda r: r["fashion"]["class_accuracy"], "class accuracy", len(CLASSES) * b.n_fashion,
                    b.vqa_n)
    lines += pairs_table(g, b)
    rows = "one row per class" + (", then two rows of composites" if b.fashion_pairs else "")
    return lines + pictures(res, g, folder, rel, rows)


def pairs_table(g: dict[str, list[dict]], b) -> list[str]:
    """Two-item composites ("a bag to the left of a sandal"), where the budget trains them."""
    have = {v: [r for r in rs if "pairs" in r["fashion"]] for v, rs in g.items()}
    have = {v: rs for v, rs in have.items() if rs}
    if not have:
        return []
    ceiling = next(iter(have.values()))[0]["fashion"]["pairs"]["ceiling"]
    lines = ["", "### Two-item composites", "",
             f"{b.fashion_pairs:.0%} of training samples are two items side by side, each at half size. "
             f"{b.n_pairs} two-item prompts x {PER_PAIR} images per variant; the judge reads each half. A composite "
             f"scores when both items are the prompted classes in the prompted order; on real composites of the "
             f"test split the judge scores {ceiling:.3f}, the ceiling. *Swapped*: both items drawn, in the wrong order.",
             "", "| variant | both items, in order | each item | swapped |", "|---|---|---|---|"]
    for v, rs in have.items():
        p = [r["fashion"]["pairs"] for r in rs]
        lines.append(f"| `{v}` | {fmt([x['pair_accuracy'] for x in p])} | {fmt([x['item_accuracy'] for x in p])} | "
                     f"{fmt([x['swapped'] for x in p])} |")
    # One-item class accuracy runs close to the judge's own test accuracy, so it separates variants little;
    # composites need two items in order, like GenEval's two-object and position prompts: verdicts of their own.
    lines += ["", "The paper's claims on the composites (both items, in order):", ""]
    return lines + claims(have, lambda r: r["fashion"]["pairs"]["pair_accuracy"], "composites", b.n_pairs * PER_PAIR)


def bench_section(folder: Path) -> list[str]:
    """Benchmark outputs (JSON lines saved under docs/results/bench/) as they were printed."""
    files = sorted(Path(folder).glob("*.jsonl"))
    if not files:
        return []
    lines = ["## Benchmarks", "", "Each file below is the output of the command in its first line, run on this "
             "2-core machine with nothing else busy; the findings section quotes the ratios.", ""]
    for f in files:
        rows = f.read_text().splitlines()
        cmd = rows[0].lstrip("# ") if rows and rows[0].startswith("#") else f"benchmarks/{f.stem}.py"
        lines += [f"### `{f.stem}`", "", f"`{cmd}`", "", "```json", *[r for r in rows if not r.startswith("#")],
                  "```", ""]
    return lines


def budget_order() -> list[str]:
    """Budgets as report sections: the full study first, then the rest as defined."""
    return sorted(BUDGETS, key=lambda k: (k != "full", list(BUDGETS).index(k)))


def write_results_md(results_dir: Path, out: Path) -> Path:
    """docs/RESULTS.md from every study folder under results_dir, the benchmarks, and findings.md."""
    results_dir = Path(results_dir)
    rel = results_dir.name  # links are relative to RESULTS.md, which sits beside results_dir
    lines = ["# Results", "",
             "Generated by `repforce study report` from `docs/results/` (result JSONs of the studies, benchmark",
             "outputs under `docs/results/bench/`, and the hand-written `docs/results/findings.md`). Every number is",
             "measured by the command given with it. ShapesEval is the shapes world's GenEval (exact judge, 6",
             "categories); the paper's numbers are GenEval at 256 px (Table 3a-c). Spreads are one standard deviation",
             "over seeds. A difference is called a tie when it is within the larger spread, or within the judging",
             "noise: one standard error of the difference of two accuracies over the judged images (or questions),",
             "treated as independent yes/no judgements. With one seed a side, the judging noise is the only floor.",
             "Each verdict gives the difference in units of the larger of the two (the tie floor): a verdict at",
             "1.0x is a knife edge.", ""]
    findings = results_dir / "findings.md"
    if findings.exists():
        lines += [findings.read_text().strip(), ""]
    for budget in budget_order():
        if (results_dir / budget).is_dir() and list((results_dir / budget).glob("*.json")):
            lines += shapes_section(budget, results_dir / budget, f"{rel}/{budget}") + [""]
    for budget in budget_order():
        folder = results_dir / f"fashion_{budget}"
        if folder.is_dir() and list(folder.glob("*.json")):
            lines += fashion_section(budget, folder, f"{rel}/fashion_{budget}") + [""]
    lines += bench_section(results_dir / "bench")
    out = Path(out)
    out.write_text("\n".join(lines).rstrip() + "\n")
    return out
