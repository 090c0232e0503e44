"""ShapesEval: the GenEval of the shapes world. Fixed prompts, an exact judge, a folder scorer.

    repforce world truth --out runs/truth          # ground-truth renders in the layout below
    repforce eval shapes --images runs/truth       # scores them (about 1.0 in every category)

Prompts come in GenEval's six categories and are drawn from a fixed seed; the set is
versioned (PROMPTS_VERSION) and a change to it must bump the version.

The judge parses an image into objects: every pixel goes to the nearest palette color
(or the background) when it lies within COLOR_TOL of it, each color's 4-connected
components above a minimum area become objects, the shape is the template (circle,
square, triangle, drawn in the component's box) with the highest IoU, and the centroid
is the mean pixel position. Rules follow GenEval: an `include` needs at least `count`
matching objects (shape, and color when given), an `exclude` fails at `count` or more
(so counting is exact), and a position prompt needs some pair that stands in the
relation by at least shapes.relation_margin along its axis.

Folder layout (the contract the generator writes to, as GenEval's):

    DIR/<index:05d>/metadata.json        {"index", "category", "prompt", "version"}
    DIR/<index:05d>/samples/<k:04d>.png  k = 0 .. n-1, RGB, canvas x canvas

index is the prompt's place in `prompts()`. metadata.json is optional for scoring, but
when present it must match the prompt set, so images of another version are refused.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

from . import shapes
from .shapes import COLORS, NUMBER_WORDS, PALETTE, RELATIONS, SHAPES

PROMPTS_VERSION = "shapeseval-v1"
PROMPT_SEED = 20260528
PER_CATEGORY = 60
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLOR_TOL = 60.0  # max RGB distance from a palette color for a pixel to count as it
MIN_AREA_FRAC = 0.25  # components smaller than this * (small box side)^2 are noise
MIN_IOU = 0.55  # below this against every template, a component is no shape


@dataclass(frozen=True)
class Prompt:
    index: int  # place in the prompt list; the folder name
    category: str  # one of CATEGORIES
    text: str  # what the generator is asked
    include: tuple[dict, ...]  # {"shape", "count", optional "color"}
    exclude: tuple[dict, ...] = ()  # {"shape", "count"}: fail at count or more
    relation: str | None = None  # position prompts: include[0] stands `relation` of include[1]

    def to_json(self) -> dict:
        return {"index": self.index, "category": self.category, "prompt": self.text,
                "include": list(self.include), "exclude": list(self.exclude),
                "relation": self.relation, "version": PROMPTS_VERSION}


# ----------------------------------------------------------------------------- prompts


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def category_space(category: str) -> list[tuple[str, tuple[dict, ...], tuple[dict, ...], str | None]]:
    """Every distinct prompt of a category, as (text, include, exclude, relation)."""
    out = []
    if category == "single_object":
        for s in SHAPES:
            out.append((f"{_article(s)} {s}", ({"shape": s, "count": 1},), (), None))
    elif category == "two_object":
        for a in SHAPES:
            for b in SHAPES:
                if a != b:
                    out.append((f"a {a} and a {b}", ({"shape": a, "count": 1}, {"shape": b, "count": 1}), (), None))
    elif category == "counting":
        for s in SHAPES:
            for n in (2, 3, 4):
                out.append((f"{NUMBER_WORDS[n]} {s}s", ({"shape": s, "count": n},), ({"shape": s, "count": n + 1},), None))
    elif category == "colors":
        for c in COLORS:
            for s in SHAPES:
                out.append((f"a {c} {s}", ({"shape": s, "color": c, "count": 1},), (), None))
    elif category == "position":
        for a in SHAPES:
            for b in SHAPES:
                if a != b:
                    for rel in RELATIONS:
                        out.append((f"a {a} {rel} a {b}", ({"shape": a, "count": 1}, {"shape": b, "count": 1}), (), rel))
    elif category == "color_attr":
        for ca in COLORS:
            for a in SHAPES:
                for cb in COLORS:
                    for b in SHAPES:
                        if a != b and ca != cb:
                            inc = ({"shape": a, "color": ca, "count": 1}, {"shape": b, "color": cb, "count": 1})
                            out.append((f"a {ca} {a} and a {cb} {b}", inc, (), None))
    else:
        raise ValueError(f"unknown category {category!r}; known: {CATEGORIES}")
    return out


def prompts(per_category: int = PER_CATEGORY) -> list[Prompt]:
    """The fixed prompt set: per category, its distinct prompts shuffled by PROMPT_SEED and
    cycled to PER_CATEGORY (small categories repeat texts; each repeat is its own prompt).

    A smaller `per_category` takes the first prompts of each category, keeping their
    indices, so a quick evaluation is a subset of the full one."""
    if not 1 <= per_category <= PER_CATEGORY:
        raise ValueError(f"per_category must be in [1, {PER_CATEGORY}], got {per_category}")
    out: list[Prompt] = []
    for ci, cat in enumerate(CATEGORIES):
        space = category_space(cat)
        order = np.random.default_rng([PROMPT_SEED, ci]).permutation(len(space))
        for k in range(per_category):
            text, inc, exc, rel = space[order[k % len(space)]]
            out.append(Prompt(ci * PER_CATEGORY + k, cat, text, inc, exc, rel))
    return out


def find_prompt(text: str) -> Prompt | None:
    """The ShapesEval prompt of this text (any category, case and spacing aside), or None."""
    key = " ".join(text.lower().split()).rstrip(".")
    for cat in CATEGORIES:
        for t, inc, exc, rel in category_space(cat):
            if t == key:
                return Prompt(-1, cat, t, inc, exc, rel)
    return None


def sample_prompt(rng: np.random.Generator, category: str | None = None) -> Prompt:
    """A random prompt (training captions use these, drawn from the train stream's rng)."""
    cat = category or CATEGORIES[rng.integers(len(CATEGORIES))]
    space = category_space(cat)
    text, inc, exc, rel = space[rng.integers(len(space))]
    return Prompt(-1, cat, text, inc, exc, rel)


def scene_for_prompt(prompt: Prompt, seed: int, canvas: int = 32) -> shapes.Scene:
    """A scene that satisfies the prompt exactly, its open attributes drawn from the seed."""
    rng = np.random.default_rng(seed)
    specs = []
    for req in prompt.include:
        specs += [{"shape": req["shape"], "color": req.get("color")} for _ in range(req["count"])]
    relation = (prompt.relation, 0, 1) if prompt.relation else None
    return shapes.make_scene(rng, specs, canvas, seed, relation)


def truth_seed(prompt: Prompt, k: int) -> int:
    """Held-out seed of the k-th ground-truth image of a prompt."""
    return shapes.scene_seed("heldout", (zlib.crc32(f"{PROMPTS_VERSION}/{prompt.index}".encode()) * 64 + k) % 2**31)


# ----------------------------------------------------------------------------- judge


@dataclass
class Detection:
    shape: str | None  # best template, None when no template fits
    color: str
    cx: float  # centroid, pixels
    cy: float
    area: int  # pixels
    iou: float  # IoU with the best template

    def to_json(self) -> dict:
        return {"shape": self.shape, "color": self.color, "cx": round(self.cx, 2), "cy": round(self.cy, 2),
                "area": self.area, "iou": round(self.iou, 3)}


_REFS = np.array([PALETTE[c] for c in COLORS] + [shapes.BACKGROUND], np.float32)  # (7, 3)
_BG = len(COLORS)  # label of the background


def fit_shape(alpha: np.ndarray) -> tuple[str, float, float, float]:
    """The shape whose rendered coverage best explains an object's alpha map.

    alpha: (H, W) in [0, 1], the object's opacity per pixel (zero away from it). Its mass
    gives the area and its first moments the centroid; for each shape those fix the side
    and the box center, the shape is rendered there, and the soft IoU sum(min)/sum(max)
    against alpha decides. Returns (shape, soft IoU, cx, cy) with the centroid in pixels."""
    h, w = alpha.shape
    area = float(alpha.sum())
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    cx, cy = float((alpha * xs).sum() / area), float((alpha * ys).sum() / area)
    sides = {"circle": 2 * np.sqrt(area / np.pi), "square": np.sqrt(area), "triangle": np.sqrt(2 * area)}
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        side = float(sides[shape])
        box_cy = cy - side / 6 if shape == "triangle" else cy  # a triangle's centroid sits 2/3 down its box
        cov = shapes.coverage(shape, cx, box_cy, side, max(h, w))[:h, :w]
        iou = float(np.minimum(alpha, cov).sum() / max(np.maximum(alpha, cov).sum(), 1e-6))
        if iou > best_iou:
            best, best_iou = shape, iou
    return best, best_iou, cx, cy


def parse(img: np.ndarray) -> list[Detection]:
    """Objects in an (H, W, 3) uint8 RGB image, as the judge sees them."""
    h, w = img.shape[:2]
    x = img.astype(np.float32)
    d = np.linalg.norm(x[:, :, None, :] - _REFS[None, None], axis=-1)  # (H, W, 7)
    label = d.argmin(-1)
    label[d.min(-1) > COLOR_TOL] = -1
    min_area = MIN_AREA_FRAC * (shapes.SIZES["small"] * min(h, w)) ** 2
    bg = _REFS[_BG]
    dets = []
    for ci, color in enumerate(COLORS):
        comps, n = ndimage.label(label == ci)
        if n == 0:
            continue
        ref = _REFS[ci] - bg
        opacity = np.clip((x - bg) @ ref / (ref @ ref), 0.0, 1.0)  # (H, W): how far each pixel is from bg toward this color
        free = (label == ci) | (label == _BG) | (label == -1)
        for k in range(1, n + 1):
            core = comps == k
            if core.sum() < min_area:
                continue
            region = ndimage.binary_dilation(core, iterations=1) & free  # the core and its anti-aliased rim
            alpha = np.where(region, opacity, 0.0)
            alpha[core] = np.maximum(alpha[core], 0.5)  # a core pixel is at least half this color
            shape, iou, cx, cy = fit_shape(alpha)
            dets.append(Detection(shape if iou >= MIN_IOU else None, color, cx, cy, int(core.sum()), iou))
    return dets


def _matches(det: Detection, req: dict) -> bool:
    return det.shape == req["shape"] and ("color" not in req or det.color == req["color"])


def judge(prompt: Prompt, dets: list[Detection], canvas: int) -> tuple[bool, str]:
    """Does the parse satisfy the prompt? (verdict, reason)"""
    for req in prompt.include:
        found = [d for d in dets if _matches(d, req)]
        if len(found) < req["count"]:
            what = " ".join(x for x in (req.get("color"), req["shape"]) if x)
            return False, f"found {len(found)} {what}, need {req['count']}"
    for req in prompt.exclude:
        found = [d for d in dets if _matches(d, req)]
        if len(found) >= req["count"]:
            return False, f"found {len(found)} {req['shape']}, need fewer than {req['count']}"
    if prompt.relation:
        a = [d for d in dets if _matches(d, prompt.include[0])]
        b = [d for d in dets if _matches(d, prompt.include[1])]
        margin = shapes.relation_margin(canvas)
        if not any(shapes.relation_holds(prompt.relation, (p.cx, p.cy), (q.cx, q.cy), margin) for p in a for q in b):
            return False, f"no {prompt.include[0]['shape']} {prompt.relation} a {prompt.include[1]['shape']}"
    return True, "ok"


# ----------------------------------------------------------------------------- folders


def write_truth(out: Path, n: int = 4, canvas: int = 32, per_category: int = PER_CATEGORY) -> None:
    """Ground-truth renders of every prompt, in the evaluation layout."""
    for p in prompts(per_category):
        folder = Path(out) / f"{p.index:05d}"
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        (folder / "metadata.json").write_text(json.dumps(p.to_json()))
        for k in range(n):
            img = shapes.render(scene_for_prompt(p, truth_seed(p, k), canvas))
            Image.fromarray(img).save(folder / "samples" / f"{k:04d}.png")


@dataclass
class Report:
    scores: dict[str, float]  # category -> accuracy, plus "overall" (mean of categories)
    images: list[dict] = field(default_factory=list)  # one row per expected image
    problems: dict[str, list[str]] = field(default_factory=dict)  # kind -> paths
    expected: int = 0

    @property
    def complete(self) -> bool:
        return not any(self.problems.get(k) for k in ("missing", "unreadable", "wrong_size", "grayscale", "mismatch"))

    def to_json(self) -> dict:
        return {"version": PROMPTS_VERSION, "complete": self.complete, "expected_images": self.expected,
                "scores": self.scores, "problems": self.problems, "images": self.images}


class EvalError(Exception):
    """A folder that cannot be scored at all."""


def _load(path: Path, canvas: int) -> tuple[np.ndarray | None, str | None]:
    try:
        with Image.open(path) as im:
            im.load()
            mode, size = im.mode, im.size
            if mode in ("L", "LA", "1", "I", "I;16", "F"):
                return None, "grayscale"
            if size != (canvas, canvas):
                return None, "wrong_size"
            if mode == "RGBA":
                bg = Image.new("RGBA", size, shapes.BACKGROUND + (255,))
                im = Image.alpha_composite(bg, im)
            return np.asarray(im.convert("RGB")), None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None, "unreadable"


def evaluate(folder: Path, n: int = 4, canvas: int = 32, per_category: int = PER_CATEGORY) -> Report:
    """Score a folder in the layout above. Gaps (missing, unreadable, wrong-size or grayscale
    images) are counted as failures and listed in report.problems; extras are listed too."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalError(f"no such folder: {folder}")
    plist = prompts(per_category)
    problems: dict[str, list[str]] = {k: [] for k in ("missing", "unreadable", "wrong_size", "grayscale", "mismatch", "extra")}
    known = {f"{p.index:05d}" for p in plist}
    for child in sorted(folder.iterdir()):
        if child.name not in known and child.name != "results.json":
            problems["extra"].append(str(child))
    if not any((folder / name).is_dir() for name in known):
        raise EvalError(f"{folder} holds none of the {len(plist)} prompt folders (00000 ..); "
                        "see the layout in repforce.worlds.shapeseval")
    rows, per_cat = [], {c: [] for c in CATEGORIES}
    for p in plist:
        pdir = folder / f"{p.index:05d}"
        meta = pdir / "metadata.json"
        meta_ok = True
        if meta.exists():
            try:
                m = json.loads(meta.read_text())
                meta_ok = m.get("prompt") == p.text and m.get("version", PROMPTS_VERSION) == PROMPTS_VERSION
            except (json.JSONDecodeError, UnicodeDecodeError):
                meta_ok = False
            if not meta_ok:
                problems["mismatch"].append(str(meta))
        samples = pdir / "samples"
        if samples.is_dir():
            expected = {f"{k:04d}.png" for k in range(n)}
            problems["extra"] += [str(f) for f in sorted(samples.iterdir()) if f.name not in expected]
        for k in range(n):
            path = samples / f"{k:04d}.png"
            row = {"index": p.index, "category": p.category, "prompt": p.text, "image": str(path)}
            if not meta_ok:
                row.update(correct=False, reason="metadata.json names another prompt")
            elif not path.exists():
                problems["missing"].append(str(path))
                row.update(correct=False, reason="missing")
            else:
                img, err = _load(path, canvas)
                if err:
                    problems[err].append(str(path))
                    row.update(correct=False, reason=err)
                else:
                    dets = parse(img)
                    ok, why = judge(p, dets, canvas)
                    row.update(correct=ok, reason=why, objects=[d.to_json() for d in dets])
            per_cat[p.category].append(row["correct"])
            rows.append(row)
    scores = {c: float(np.mean(v)) for c, v in per_cat.items()}
    scores["overall"] = float(np.mean([scores[c] for c in CATEGORIES]))
    return Report(scores, rows, {k: v for k, v in problems.items() if v}, len(rows))


def score_images(images: dict[tuple[int, int], np.ndarray], per_category: int = PER_CATEGORY) -> Report:
    """Score in-memory images keyed by (prompt index, k); used by tests and the trainer."""
    plist = {p.index: p for p in prompts(per_category)}
    rows, per_cat = [], {c: [] for c in CATEGORIES}
    for (idx, k), img in sorted(images.items()):
        p = plist[idx]
        dets = parse(img)
        ok, why = judge(p, dets, img.shape[0])
        per_cat[p.category].append(ok)
        rows.append({"index": idx, "k": k, "category": p.category, "prompt": p.text, "correct": ok,
                     "reason": why, "objects": [d.to_json() for d in dets]})
    scores = {c: float(np.mean(v)) for c, v in per_cat.items() if v}
    scores["overall"] = float(np.mean(list(scores.values())))
    return Report(scores, rows, {}, len(rows))
