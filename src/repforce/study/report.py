"""A self-contained HTML report of a run: loss curves, a judged gallery with the rep-token
maps that guided each image, ShapesEval and VQA tables, and the command and config.

    write_report(out_dir / "report.html", runs=[...], evaluation=..., command=...)

Everything (figures, images) is embedded as base64 PNG, so the one file can be mailed or
opened from anywhere. The rep-token maps are "decoded" by coloring each rep id with the
mean color of the image cells the quantizer assigns to it (measured on training images),
so a map reads as a coarse sketch of the image it planned.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ..config import DataConfig  # noqa: E402
from ..data import sample_at  # noqa: E402
from ..worlds.shapeseval import CATEGORIES  # noqa: E402


def png_b64(img: np.ndarray | Image.Image, scale: int = 1) -> str:
    im = img if isinstance(img, Image.Image) else Image.fromarray(img)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def fig_b64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def read_log(run: Path) -> list[dict]:
    """The logged steps of a run in order. A run resumed from a checkpoint logs again the steps after it:
    the later rows replace the earlier ones from the leg that was cut off."""
    path = Path(run) / "log.jsonl"
    if not path.exists():
        return []
    rows: list[dict] = []
    for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip()):
        if "step" not in r:
            continue
        while rows and rows[-1]["step"] >= r["step"]:
            rows.pop()
        rows.append(r)
    return rows


def loss_figure(runs: dict[str, Path]):
    """One panel per loss term, one line per run; returns a matplotlib figure."""
    logs = {name: read_log(p) for name, p in runs.items()}
    terms = sorted({k for rows in logs.values() for r in rows for k in r if k.startswith("loss_")})
    extra = [k for k in ("rep_ppl", "rep_acc") if any(k in r for rows in logs.values() for r in rows)]
    panels = terms + extra
    if not panels:  # no step logged yet: say so rather than draw nothing
        fig, ax = plt.subplots(figsize=(3.6, 2.8))
        ax.text(0.5, 0.5, "no logged step yet", ha="center", va="center")
        ax.axis("off")
        return fig
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 2.8), squeeze=False)
    for ax, term in zip(axes[0], panels):
        positive = False
        for name, rows in logs.items():
            pts = [(r["step"], r[term]) for r in rows if term in r]
            if pts:
                s, v = zip(*pts)
                ax.plot(s, v, label=name, lw=1.2, color=f"C{list(logs).index(name)}")
                positive = positive or max(v) > 0
        ax.set_title(term)
        ax.set_xlabel("step")
        # REPA's loss is a negative cosine; a term that is 0 throughout (L_LM of a generation-only run) stays linear
        if term.startswith("loss") and term != "loss_repa" and positive:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles = {}
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.tight_layout()
    fig.legend(handles.values(), handles.keys(), loc="upper right", fontsize=8, ncol=len(handles),
               bbox_to_anchor=(1.0, 1.08))
    return fig


@torch.no_grad()
def prototype_colors(engine, n_images: int = 512, seed: int = 12345) -> np.ndarray:
    """(K, 3) uint8: the mean RGB of the image cells each rep id is assigned to.

    Cells come from training-stream images; ids from the EMA encoder and the quantizer's
    current prototypes without updating them. Ids never assigned are drawn mid gray."""
    m, c = engine.model, engine.cfg
    imgs = np.stack([sample_at(DataConfig(seed=seed, canvas=c.image_size), j, gen_fraction=1.0).image
                     for j in range(n_images)])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    was = m.quantizer.training
    m.quantizer.eval()
    ids, _ = m.rep_targets(x)  # (n, M)
    m.quantizer.train(was)
    cell = c.image_size // int(np.sqrt(c.n_rep))
    g = c.image_size // cell
    cells = imgs.reshape(n_images, g, cell, g, cell, 3).mean(axis=(2, 4)).reshape(n_images * g * g, 3)  # (n*M, 3)
    flat = ids.reshape(-1).numpy()
    K = c.codebook_size
    sums = np.zeros((K, 3))
    np.add.at(sums, flat, cells)
    counts = np.bincount(flat, minlength=K)[:, None]
    colors = np.where(counts > 0, sums / np.maximum(counts, 1), 128.0)
    return colors.round().astype(np.uint8)


def rep_map(ids: np.ndarray, colors: np.ndarray, side: int) -> np.ndarray:
    """A (side, side, 3) image of a rep-id grid, each cell painted with its id's color."""
    g = int(np.sqrt(len(ids)))
    grid = colors[ids.reshape(g, g)]  # (g, g, 3)
    return np.kron(grid, np.ones((side // g, side // g, 1), np.uint8)).astype(np.uint8)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1180px;color:#222;
background:#fafafa;line-height:1.45}
h1{margin-bottom:4px} h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;margin-top:0} table{border-collapse:collapse;margin:8px 0} td,th{padding:4px 10px;
border-bottom:1px solid #e3e3e3;text-align:right} th{background:#f0f0f0} td:first-child,th:first-child{text-align:left}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:10px}
.card{background:#fff;border:1px solid #e0e0e0;border-radius:6px;padding:6px;font-size:12px}
.card img{image-rendering:pixelated;width:72px;height:72px;border:1px solid #ccc}
.ok{color:#1a7f37;font-weight:600} .bad{color:#c62828;font-weight:600} .why{color:#777}
pre{background:#f3f3f3;padding:10px;overflow:auto;font-size:12px;border-radius:4px}
.kpi{display:inline-block;background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 14px;margin:4px 8px 4px 0}
.kpi b{font-size:22px;display:block}
"""


def _cards(gallery: list[dict]) -> list[str]:
    parts = ["<div class='gallery'>"]
    for g in gallery:
        verdict = "<span class='ok'>pass</span>" if g["correct"] else "<span class='bad'>fail</span>"
        rep = f"<img alt='rep map' src='{png_b64(g['rep'])}'>" if g.get("rep") is not None else ""
        parts.append(f"<div class='card'><div>{html.escape(g['prompt'])}</div><img alt='sample' "
                     f"src='{png_b64(g['image'])}'> {rep}<div>{verdict} <span class='why'>"
                     f"{html.escape(g['reason'])}</span></div></div>")
    return parts + ["</div>"]


def write_report(path: str | Path, title: str, runs: dict[str, Path], shapes: dict, vqa: dict | None,
                 gallery: list[dict], command: str, config: dict, notes: list[str] | None = None,
                 caption: dict | None = None, showcase: tuple[str, list[dict]] | None = None) -> Path:
    """Write report.html. gallery rows: {"prompt", "image" (array), "rep" (array or None),
    "correct", "reason"}; shapes: ShapesEval scores by category + overall; showcase: (title, rows)
    of a second gallery on the same prompts (the shipped model's)."""
    path = Path(path)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    if notes:
        parts.append("<p class='sub'>" + "<br>".join(html.escape(n) for n in notes) + "</p>")
    parts.append("<div>")
    parts.append(f"<span class='kpi'>ShapesEval overall<b>{shapes['overall']:.3f}</b></span>")
    if vqa:
        parts.append(f"<span class='kpi'>VQA accuracy<b>{vqa['accuracy']:.3f}</b></span>")
    if caption:
        parts.append(f"<span class='kpi'>Caption exact match<b>{caption['exact_match']:.3f}</b></span>")
    parts.append("</div>")

    parts.append("<h2>Training</h2>")
    parts.append(f"<img alt='loss curves' style='max-width:100%' src='{fig_b64(loss_figure(runs))}'>")

    parts.append("<h2>ShapesEval</h2><table><tr><th>category</th><th>accuracy</th></tr>")
    for cat in (*CATEGORIES, "overall"):
        if cat in shapes:
            parts.append(f"<tr><td>{cat}</td><td>{shapes[cat]:.3f}</td></tr>")
    parts.append("</table>")
    if vqa:
        parts.append("<h2>Understanding (held-out VQA)</h2><table><tr><th>question kind</th><th>accuracy</th></tr>")
        for kind, acc in vqa["by_kind"].items():
            parts.append(f"<tr><td>{html.escape(kind)}</td><td>{acc:.3f}</td></tr>")
        parts.append(f"<tr><td><b>all ({vqa['n']})</b></td><td><b>{vqa['accuracy']:.3f}</b></td></tr></table>")
        parts.append("<table><tr><th>question</th><th>truth</th><th>model</th></tr>")
        for ex in vqa["examples"][:8]:
            parts.append(f"<tr><td>{html.escape(ex['q'])}</td><td>{html.escape(ex['truth'])}</td>"
                         f"<td>{html.escape(ex['pred'])}</td></tr>")
        parts.append("</table>")

    parts.append("<h2>Gallery</h2><p class='sub'>Each card: the generated image, the rep-token map that guided "
                 "it (each id painted with the mean color of the cells it stands for), and the judge's verdict.</p>")
    parts += _cards(gallery)
    if showcase:
        n_ok = sum(bool(g["correct"]) for g in showcase[1])
        parts.append(f"<h3>{html.escape(showcase[0])}: {n_ok} of {len(showcase[1])} pass</h3>")
        parts += _cards(showcase[1])

    parts.append("<h2>Reproduce</h2><pre>" + html.escape(command) + "</pre>")
    parts.append("<details><summary>Resolved config</summary><pre>" + html.escape(json.dumps(config, indent=1))
                 + "</pre></details>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts))
    return path
