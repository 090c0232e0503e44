"""Evaluate a model: generate the ShapesEval prompts in the eval layout and score them, and
measure VQA accuracy and caption exact match on held-out scenes.

    repforce generate --ckpt runs/pixel_rf --prompts shapeseval --out runs/pixel_rf/shapeseval
    repforce eval shapes --images runs/pixel_rf/shapeseval
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .. import flow
from ..engine import Engine, GenOptions, to_uint8
from ..sequence import GEN
from ..vae import encode
from ..worlds import fashion as fm
from ..worlds import metrics, shapes, shapeseval


def write_shapeseval(engine: Engine, out: str | Path, n: int = 4, options: GenOptions | None = None, seed: int = 0,
                     per_category: int = shapeseval.PER_CATEGORY, batch_size: int = 64,
                     progress: bool = True) -> dict[tuple[int, int], np.ndarray]:
    """Generate n images for every ShapesEval prompt into `out` (the eval layout); also
    returns them keyed by (prompt index, k). Prompts go batch_size // n at a time, the
    batch starting at prompt i seeded with seed + i, so a rerun with the same batch
    size reproduces every image."""
    out = Path(out)
    images: dict[tuple[int, int], np.ndarray] = {}
    plist = shapeseval.prompts(per_category)
    per_batch = max(1, batch_size // n)
    for s in tqdm(range(0, len(plist), per_batch), desc="shapeseval", disable=not progress):
        chunk = plist[s:s + per_batch]
        arr, _ = engine.generate_arrays([p.text for p in chunk], n, seed + s, options, batch_size=len(chunk) * n)
        for j, p in enumerate(chunk):
            folder = out / f"{p.index:05d}"
            (folder / "samples").mkdir(parents=True, exist_ok=True)
            (folder / "metadata.json").write_text(json.dumps(p.to_json()))
            for k in range(n):
                a = arr[j * n + k]
                Image.fromarray(a).save(folder / "samples" / f"{k:04d}.png")
                images[(p.index, k)] = a
    return images


def oracle_shapeseval(engine: Engine, n: int = 2, options: GenOptions | None = None, seed: int = 0,
                      per_category: int = shapeseval.PER_CATEGORY, batch_size: int = 64) -> tuple[dict, np.ndarray]:
    """The pixel stage alone: every ShapesEval prompt's rep tokens taken from its ground-truth renders
    (held-out truth scenes, the model's own encoder and quantizer, as in training), then pixels
    sampled under the prompt and those tokens and judged. Beside the model's own score it says
    which stage loses the points: a high oracle and a low score blame the sampled tokens, a low
    oracle the pixel renderer. Returns (the scores of shapeseval.score_images, images prompt-major)."""
    if not engine.cfg.rep_ids:
        raise ValueError(f"the oracle needs rep ids; a {engine.cfg.variant} model has none")
    o = options or GenOptions()
    plist = shapeseval.prompts(per_category)
    rows = [(p, k) for p in plist for k in range(n)]
    canvas = engine.cfg.image_size
    truth = [shapes.render(shapeseval.scene_for_prompt(p, shapeseval.truth_seed(p, k), canvas)) for p, k in rows]
    gen = torch.Generator(engine.device).manual_seed(seed)
    out = []
    with torch.no_grad(), engine._autocast():
        for s in range(0, len(rows), batch_size):
            x = torch.stack([engine.image_tensor(a) for a in truth[s:s + batch_size]]).to(engine.device)
            ids, _ = engine.model.rep_targets(x)
            x = engine.sample_pixels([p.text for p, _ in rows[s:s + batch_size]], ids, o, gen)
            out.append(to_uint8(engine.to_pixels(x)))  # vae_rf: latents decoded
    arr = np.concatenate(out)
    scored = shapeseval.score_images({(p.index, k): a for (p, k), a in zip(rows, arr)}, per_category)
    return scored.scores, arr


@torch.no_grad()
def rep_reliance(engine: Engine, n: int = 64, ts: tuple[float, ...] = (0.1, 0.3), seed: int = 0) -> dict:
    """How much the pixel stage reads its rep tokens: on n held-out scenes under their captions, the
    x-prediction's MSE (of the VAE latents it diffuses, for vae_rf) at each t given the scene's own rep
    ids (ground truth, as in training) and given another scene's (the batch rolled by one), same noise. A renderer that ignores the rep
    tokens scores the two alike (gap 0); at low t, where the noisy pixels say little, a renderer
    that reads them is much closer with its own. Returns {"mse_own": {t: .}, "mse_other": {t: .},
    "gap": {t: other - own}}."""
    if not engine.cfg.rep_ids:
        raise ValueError(f"rep reliance needs rep ids; a {engine.cfg.variant} model has none")
    m, c = engine.model, engine.cfg
    scenes = shapes.scenes("heldout", 0, n, c.image_size)
    x = torch.stack([engine.image_tensor(shapes.render(sc)) for sc in scenes]).to(engine.device).float()
    prompts = [shapes.caption(sc) for sc in scenes]
    z = encode(engine.vae, x) if c.variant.startswith("vae") else x  # what the pixel stage diffuses
    g = torch.Generator(device="cpu").manual_seed(seed)
    e = torch.randn(z.shape, generator=g).to(engine.device)
    out = {"mse_own": {}, "mse_other": {}, "gap": {}}
    with engine._autocast():
        ids, _ = m.rep_targets(x)
        for key, reps in (("mse_own", ids), ("mse_other", ids.roll(1, 0))):
            h, kind, pos = engine._gen_prefix_batch(prompts, reps)
            h, kind, pos = h[:n], kind[:n], pos[:n]  # the conditional rows
            gkind = torch.full((n, c.n_gen), GEN, device=engine.device)
            gpos = pos[:, -1:] + 1 + torch.arange(c.n_gen, device=engine.device)
            for t in ts:
                tt = torch.full((n,), t, device=engine.device)
                hid = m.forward_hidden(torch.cat([h, m.embed_gen(flow.interpolate(z, e, tt), tt)], 1),
                                       torch.cat([kind, gkind], 1), torch.cat([pos, gpos], 1))[:, -c.n_gen:]
                out[key][str(t)] = float((m.gen_pred(hid).float() - z).pow(2).mean())
    out["gap"] = {t: out["mse_other"][t] - out["mse_own"][t] for t in out["mse_own"]}
    return out


def vqa(engine: Engine, n: int = 200, canvas: int = 32, batch_size: int = 50) -> dict:
    """VQA exact-match accuracy on n fixed held-out questions, overall and per question kind."""
    items = metrics.heldout_vqa(n, canvas)
    preds: list[str] = []
    for s in range(0, n, batch_size):
        chunk = items[s:s + batch_size]
        preds += engine.answer([shapes.render(sc) for sc, _, _ in chunk], [q for _, q, _ in chunk], max_new_tokens=8)
    truths = [a for _, _, a in items]
    kinds: dict[str, list[bool]] = {}
    for (_, q, a), p in zip(items, preds):
        kind = q.split()[0] + " " + q.split()[1]  # "what color", "how many", "what shape", "is there"
        kinds.setdefault(kind, []).append(metrics.exact_match(p, a))
    return {"accuracy": metrics.vqa_accuracy(preds, truths), "n": n,
            "by_kind": {k: float(np.mean(v)) for k, v in sorted(kinds.items())},
            "examples": [{"q": q, "truth": a, "pred": p} for (_, q, a), p in list(zip(items, preds))[:12]]}


def captions(engine: Engine, n: int = 100, canvas: int = 32) -> dict:
    items = metrics.heldout_captions(n, canvas)
    preds = engine.caption([shapes.render(s) for s, _ in items], max_new_tokens=40)
    return {"exact_match": metrics.caption_exact_match(preds, [c for _, c in items]), "n": n,
            "examples": [{"truth": c, "pred": p} for (_, c), p in list(zip(items, preds))[:6]]}


def fashion_vqa(engine: Engine, n: int = 500, root: str | Path | None = None) -> float:
    """Exact-match accuracy of "what is this?" on the first n Fashion-MNIST test images."""
    x_te, y_te = fm.load_split("test", root or fm.DEFAULT_ROOT)
    imgs = [fm.to_canvas(im, engine.cfg.image_size) for im in x_te[:n]]
    preds = []
    for s in range(0, n, 100):
        preds += engine.answer(imgs[s:s + 100], [fm.QUESTION] * len(imgs[s:s + 100]), max_new_tokens=6)
    return metrics.vqa_accuracy(preds, [fm.CLASSES[k] for k in y_te[:n]])


def fashion(engine: Engine, n_per_class: int = 20, options: GenOptions | None = None, seed: int = 0,
            vqa_n: int = 500, judge_dir: str | Path | None = None, root: str | Path | None = None,
            n_pairs: int = 0, n_per_pair: int = 4) -> tuple[dict, np.ndarray, np.ndarray | None]:
    """Fashion-MNIST: class accuracy and Frechet distance (judge features) of n_per_class
    images per class prompt, and VQA accuracy ("what is this?") on the first vqa_n test images (none for 0).
    With n_pairs, also n_per_pair composites for each of n_pairs two-item prompts ("a bag to the
    left of a sandal"), scored for both items in order, beside the judge's ceiling on real ones.
    Returns the scores, the class images (class-major) and the composite images (pair-major) or None."""
    root = root or fm.DEFAULT_ROOT
    judge, meta = fm.load_judge(judge_dir) if judge_dir else fm.load_judge()
    arr, _ = engine.generate_arrays(fm.prompts(), n_per_class, seed, options)
    labels = np.repeat(np.arange(len(fm.CLASSES)), n_per_class)
    scores = fm.score_generated(arr, labels, judge, root)
    pairs = None
    if n_pairs:
        pj, pmeta = fm.load_judge(fm.PAIR_JUDGE_DIR)
        plist = fm.pair_prompts(n_pairs)
        pairs, _ = engine.generate_arrays([fm.pair_caption(a, b) for a, b in plist], n_per_pair, seed, options)
        scores["pairs"] = {**fm.score_pairs(pairs, np.repeat(np.array(plist), n_per_pair, 0), pj),
                           "ceiling": fm.pair_ceiling(pj, root, canvas=engine.cfg.image_size)["pair_accuracy"],
                           "judge": {"version": pmeta["version"], "sha256": pmeta["sha256"]}}
    if vqa_n:
        scores["vqa"] = fashion_vqa(engine, vqa_n, root)
    scores["judge"] = {"version": meta["version"], "sha256": meta["sha256"], "test_accuracy": meta["test_accuracy"]}
    return scores, arr, pairs
