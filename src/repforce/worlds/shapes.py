"""The shapes world: seeded scenes of flat-colored shapes, their renders and their text.

    python -m repforce.cli world preview --n 16 --out runs/preview

A scene is 1-4 objects on a plain light background. Each object has a shape, a color
from a fixed palette, one of two sizes and a continuous position; objects never touch
(their boxes keep a gap), so a judge can take them apart again by color and connected
components. Rendering is analytic coverage on a supersampled grid, so edges are
anti-aliased yet every interior pixel is exactly a palette color.

Seed spaces: scene i of the train stream uses seed i, scene i of the held-out stream
uses seed HELDOUT_BASE + i. `scene_seed` refuses indices that would cross over, so the
two streams can never share a seed.

Coordinates: x grows to the right, y grows downwards (image rows), in pixels of the
canvas; an object's (cx, cy) is the center of its bounding box.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle")
PALETTE = {  # name -> RGB; pairwise distances >= 100 so a judge can recover them
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 205, 30),
    "purple": (150, 50, 180),
    "cyan": (40, 200, 210),
}
COLORS = tuple(PALETTE)
BACKGROUND = (240, 240, 235)
SIZES = {"small": 0.22, "large": 0.34}  # box side as a fraction of the canvas side
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
RELATIONS = ("left of", "right of", "above", "below")
MAX_OBJECTS = 4
HELDOUT_BASE = 2**31  # seeds >= this belong to the held-out stream
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Obj:
    shape: str  # one of SHAPES
    color: str  # a key of PALETTE
    size: str  # "small" | "large"
    cx: float  # box center, pixels from the left edge
    cy: float  # box center, pixels from the top edge


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    canvas: int = 32  # image side in pixels
    seed: int = -1  # the seed it was drawn from (-1: built by hand)

    def to_json(self) -> dict:
        return {"canvas": self.canvas, "seed": self.seed, "objects": [asdict(o) for o in self.objects]}

    @staticmethod
    def from_json(d: dict) -> "Scene":
        return Scene(tuple(Obj(**o) for o in d["objects"]), d["canvas"], d.get("seed", -1))

    def digest(self) -> str:
        return hashlib.sha1(json.dumps(self.to_json()["objects"], sort_keys=True).encode()).hexdigest()


def scene_seed(split: str, index: int) -> int:
    """Seed of scene `index` of a stream; the two streams live in disjoint halves of [0, 2**32)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0 <= index < HELDOUT_BASE:
        raise ValueError(f"scene index {index} outside [0, 2**31)")
    return index if split == "train" else HELDOUT_BASE + index


def split_of_seed(seed: int) -> str:
    return "train" if seed < HELDOUT_BASE else "heldout"


def box_side(size: str, canvas: int) -> float:
    return SIZES[size] * canvas


# ----------------------------------------------------------------------------- geometry


def coverage(shape: str, cx: float, cy: float, side: float, canvas: int, ss: int = 4) -> np.ndarray:
    """Fraction of each pixel covered by the shape, (canvas, canvas) float32 in [0, 1].

    Sampled at ss x ss points per pixel. The triangle is isosceles, apex at the top
    center of its box, base along the bottom edge."""
    offs = (np.arange(ss) + 0.5) / ss
    g = (np.arange(canvas)[:, None] + offs[None, :]).reshape(-1)  # (canvas*ss,)
    y, x = g[:, None], g[None, :]  # sample points, broadcast to (canvas*ss, canvas*ss)
    h = side / 2
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= h * h
    elif shape == "square":
        inside = (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    elif shape == "triangle":
        top, bottom = cy - h, cy + h
        frac = (y - top) / side  # 0 at the apex, 1 at the base
        inside = (y >= top) & (y <= bottom) & (np.abs(x - cx) <= frac * h)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    cov = inside.reshape(canvas, ss, canvas, ss).mean(axis=(1, 3))
    return cov.astype(np.float32)


def render(scene: Scene) -> np.ndarray:
    """The scene as a (canvas, canvas, 3) uint8 RGB array."""
    n = scene.canvas
    img = np.broadcast_to(np.array(BACKGROUND, np.float32), (n, n, 3)).copy()
    for o in scene.objects:
        a = coverage(o.shape, o.cx, o.cy, box_side(o.size, n), n)[..., None]
        img = img * (1 - a) + np.array(PALETTE[o.color], np.float32) * a
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- sampling


def _gap(canvas: int) -> float:
    return max(1.0, canvas / 32)  # minimum free pixels between two boxes and to the border


def _boxes_apart(a: tuple[float, float, float], b: tuple[float, float, float], gap: float) -> bool:
    (ax, ay, asd), (bx, by, bsd) = a, b
    reach = (asd + bsd) / 2 + gap
    return abs(ax - bx) >= reach or abs(ay - by) >= reach


def place(rng: np.random.Generator, sides: list[float], canvas: int, relation=None, tries: int = 200):
    """Box centers for boxes of the given sides, pairwise apart; None if it fails.

    `relation` (name, i, j, margin) asks that box i stands in that relation to box j,
    with centroid distance along the relation's axis of at least `margin` pixels."""
    gap = _gap(canvas)
    for _ in range(tries):
        centers: list[tuple[float, float, float]] = []
        for s in sides:
            lo, hi = s / 2 + gap, canvas - s / 2 - gap
            for _ in range(50):
                c = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)), s)
                if all(_boxes_apart(c, d, gap) for d in centers):
                    centers.append(c)
                    break
            else:
                break
        if len(centers) != len(sides):
            continue
        if relation is not None:
            name, i, j, margin = relation
            if not relation_holds(name, centers[i][:2], centers[j][:2], margin):
                continue
        return [(x, y) for x, y, _ in centers]
    return None


def relation_holds(name: str, a: tuple[float, float], b: tuple[float, float], margin: float) -> bool:
    """Does a point a stand `name` of point b, by at least `margin` along that axis?"""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if name == "left of":
        return dx <= -margin
    if name == "right of":
        return dx >= margin
    if name == "above":
        return dy <= -margin
    if name == "below":
        return dy >= margin
    raise ValueError(f"unknown relation {name!r}; known: {RELATIONS}")


def relation_margin(canvas: int) -> float:
    """Centroid offset that makes a relation hold, for the judge and the questions alike."""
    return 0.1 * canvas


def make_scene(rng: np.random.Generator, specs: list[dict], canvas: int, seed: int = -1, relation=None) -> Scene:
    """A scene whose objects follow `specs` (dicts with optional shape/color/size);
    what a spec leaves open is drawn from rng."""
    for _ in range(100):
        filled = [
            {
                "shape": s.get("shape") or SHAPES[rng.integers(len(SHAPES))],
                "color": s.get("color") or COLORS[rng.integers(len(COLORS))],
                "size": s.get("size") or ("small", "large")[rng.integers(2)],
            }
            for s in specs
        ]
        sides = [box_side(f["size"], canvas) for f in filled]
        rel = None if relation is None else (*relation, relation_margin(canvas) * 2)
        centers = place(rng, sides, canvas, rel)
        if centers is not None:
            objs = tuple(Obj(f["shape"], f["color"], f["size"], round(x, 3), round(y, 3))
                         for f, (x, y) in zip(filled, centers))
            return Scene(objs, canvas, seed)
    raise RuntimeError(f"could not place {len(specs)} objects on a {canvas}px canvas")


def sample_scene(seed: int, canvas: int = 32) -> Scene:
    """The scene of a seed: 1-4 objects, every attribute drawn uniformly."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    return make_scene(rng, [{} for _ in range(n)], canvas, seed)


def scenes(split: str, start: int, count: int, canvas: int = 32) -> list[Scene]:
    return [sample_scene(scene_seed(split, i), canvas) for i in range(start, start + count)]


# ----------------------------------------------------------------------------- text


def plural(shape: str) -> str:
    return shape + "s"


def noun_phrase(count: int, words: list[str], shape: str) -> str:
    """'a red circle', 'two red circles' (words: adjectives before the shape)."""
    adj = " ".join(words)
    noun = shape if count == 1 else plural(shape)
    head = ("an" if (adj or noun)[0] in "aeiou" else "a") if count == 1 else NUMBER_WORDS[count]
    return " ".join(x for x in (head, adj, noun) if x)


def join_and(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene) -> str:
    """The canonical caption: identical objects grouped, groups left to right by their
    leftmost member, e.g. 'two small red circles and a large blue square'."""
    groups: dict[tuple[str, str, str], list[Obj]] = {}
    for o in scene.objects:
        groups.setdefault((o.size, o.color, o.shape), []).append(o)
    order = sorted(groups.items(), key=lambda kv: (min(o.cx for o in kv[1]), kv[0]))
    return join_and([noun_phrase(len(objs), [size, color], shape) for (size, color, shape), objs in order])


def _unique(scene: Scene, **attrs) -> list[Obj]:
    return [o for o in scene.objects if all(getattr(o, k) == v for k, v in attrs.items())]


RELATION_PREFIX = "what shape is "  # every relation question starts so: "what shape is left of the red circle?"


def is_relation(question: str) -> bool:
    """Whether a question of questions() asks what stands in a relation to an object."""
    return question.startswith(RELATION_PREFIX)


def questions(scene: Scene) -> list[tuple[str, str]]:
    """Every unambiguous question/answer pair the scene supports, in a fixed order.

    Kinds: color of a shape (when that shape is unique), count of a shape or a color,
    what shape stands in a relation to a uniquely described object (when exactly one
    object does, by the relation margin, and none is borderline), and yes/no existence
    of a colored shape (the 'no' ones picked from absent combinations)."""
    qa: list[tuple[str, str]] = []
    margin = relation_margin(scene.canvas)
    for shape in SHAPES:
        objs = _unique(scene, shape=shape)
        if len(objs) == 1:
            qa.append((f"what color is the {shape}?", objs[0].color))
    for shape in SHAPES:
        qa.append((f"how many {plural(shape)} are there?", NUMBER_WORDS[len(_unique(scene, shape=shape))]))
    for color in COLORS:
        n = len(_unique(scene, color=color))
        if n:
            qa.append((f"how many {color} objects are there?", NUMBER_WORDS[n]))
    for ref in scene.objects:
        if len(_unique(scene, shape=ref.shape, color=ref.color)) != 1:
            continue
        others = [o for o in scene.objects if o is not ref]
        for rel in RELATIONS:
            hits = [o for o in others if relation_holds(rel, (o.cx, o.cy), (ref.cx, ref.cy), margin)]
            near = [o for o in others if relation_holds(rel, (o.cx, o.cy), (ref.cx, ref.cy), margin / 2)]
            if len(hits) == 1 and len(near) == 1:
                qa.append((f"{RELATION_PREFIX}{rel} the {ref.color} {ref.shape}?", hits[0].shape))
    present = {(o.color, o.shape) for o in scene.objects}
    for color, shape in sorted(present):
        qa.append((f"is there a {color} {shape}?", "yes"))
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    pick = np.random.default_rng(abs(scene.seed) + 7).permutation(len(absent))[: len(present)]
    for k in sorted(pick):
        color, shape = absent[k]
        qa.append((f"is there a {color} {shape}?", "no"))
    return qa


def confusable(scene: Scene) -> list[tuple[str, str]]:
    """(color, shape) pairs absent from the scene that share their shape or their color with an object
    in it: the negatives that need the color and the shape checked together ("is there a red circle?"
    with a blue circle, or with a red square). The shipped shapes_vlm answers "yes" to every held-out
    one of the first kind (docs/results/findings.md: its "is there" checks the shape only)."""
    present = {(o.color, o.shape) for o in scene.objects}
    colors, shapes_ = {o.color for o in scene.objects}, {o.shape for o in scene.objects}
    return [(c, s) for c in COLORS for s in SHAPES if (s in shapes_ or c in colors) and (c, s) not in present]


def relation_parts(question: str) -> tuple[str, str]:
    """(relation, reference) of a relation question: ("left of", "red circle") for "what shape is left of
    the red circle?"."""
    rel = next(r for r in RELATIONS if question.startswith(f"{RELATION_PREFIX}{r} the "))
    return rel, question[len(f"{RELATION_PREFIX}{rel} the "):-1]


def relation_decides(scene: Scene, question: str) -> bool:
    """Whether a relation question of questions(scene) needs its relation: the objects other than its
    reference do not all share one shape, so "the other object's shape" does not answer it."""
    ref = relation_parts(question)[1]
    return len({o.shape for o in scene.objects if f"{o.color} {o.shape}" != ref}) > 1


def train_questions(scene: Scene, rng: np.random.Generator, hard: float) -> list[tuple[str, str]]:
    """questions(scene) with each "no" existence question replaced, at probability `hard`, by one
    about a confusable pair when the scene has one (drawn without repeats). Training only: held-out
    evaluation asks questions(scene) as it is, so the yes/no balance and every other kind are kept."""
    qa = questions(scene)
    pool = [f"is there a {c} {s}?" for c, s in confusable(scene)]
    asked = {q for q, _ in qa}
    pool = [q for q in pool if q not in asked]
    if not hard or not pool:
        return qa
    order = list(rng.permutation(len(pool)))
    out = []
    for q, a in qa:
        if a == "no" and q.startswith("is there") and order and rng.random() < hard:
            q = pool[order.pop()]
        out.append((q, a))
    return out
