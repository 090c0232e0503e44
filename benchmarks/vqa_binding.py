"""Does the vlm check an object's color and its shape together? Every "is there a <color> <shape>?"
asked of held-out one-object scenes, scored by how the asked pair relates to the object.

    .venv/bin/python benchmarks/vqa_binding.py --ckpt shapes_vlm runs/vlm_hn3 --out docs/results/bench/vqa_binding.jsonl

On a one-object scene there is nothing to bind wrongly, so the four groups separate what the model
checks: `positive` (the object itself: "yes"), `same shape` (its shape in another color: "no"),
`same color` (its color on another shape: "no"), `neither` ("no"). A model that checks the shape
only scores 1, 0, 1, 1; one that checks both scores 1, 1, 1, 1. Greedy answers, exact match. One JSON
line per checkpoint, appended. --relations adds a line per checkpoint for the relation questions ("what
shape is left of the <color> <shape>?") of the first 600 held-out VQA items: accuracy by relation and
object count, and what a wrong answer names (the reference's own shape, another object's, or one absent).
--relation-scenes N adds, per checkpoint and split (train, heldout), every relation question of the first
N scenes, by how many distinct shapes the scene holds: with one or two, "the other object's shape" is
right without reading the relation; with three it is a choice between two, so 0.5 is chance. Equal
train and held-out figures say the model underfits relations rather than failing to generalise.
--opposite N asks every relation question of the held-out scenes with three distinct shapes among the
first N twice, as asked and with the opposite relation ("right of" for "left of"): a model that reads the
relation changes its answer; `same_under_opposite` is how often it does not.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from jsonl_log import emit, start  # benchmarks/ (this script's folder)

from repforce.engine import load
from repforce.worlds import metrics, shapes


def groups(n_scenes: int) -> list[tuple[object, str, str, str]]:
    """(scene, question, answer, group) for every color x shape on the one-object scenes among the
    first n_scenes held-out ones."""
    rows = []
    for scene in shapes.scenes("heldout", 0, n_scenes):
        if len(scene.objects) != 1:
            continue
        o = scene.objects[0]
        for c in shapes.COLORS:
            for s in shapes.SHAPES:
                group = ("positive" if (c, s) == (o.color, o.shape) else "same shape" if s == o.shape
                         else "same color" if c == o.color else "neither")
                rows.append((scene, f"is there a {c} {s}?", "yes" if group == "positive" else "no", group))
    return rows


def relations(eng, ckpt: str, n: int = 600) -> dict:
    """Relation questions among the first n held-out VQA items: accuracy by "<relation>, <objects>" and
    the kinds of wrong answers."""
    items = [it for it in metrics.heldout_vqa(n, 32) if shapes.is_relation(it[1])]
    preds = eng.answer([shapes.render(sc) for sc, _, _ in items], [q for _, q, _ in items], max_new_tokens=4)
    hits, wrong = defaultdict(list), defaultdict(int)
    for (scene, q, a), p in zip(items, preds):
        rel, ref = q.removeprefix(shapes.RELATION_PREFIX).removesuffix("?").split(" the ")
        hits[f"{rel}, {len(scene.objects)} objects"].append(p.strip() == a)
        if p.strip() != a:
            kind = ("the reference's shape" if p.strip() == ref.split()[-1] else
                    "another object's shape" if p.strip() in {o.shape for o in scene.objects} else "absent")
            wrong[kind] += 1
    return {"bench": "vqa_relations", "ckpt": ckpt, "questions": len(items),
            "accuracy": round(sum(sum(v) for v in hits.values()) / len(items), 3),
            "by": {k: [len(v), round(sum(v) / len(v), 3)] for k, v in sorted(hits.items())}, "wrong": dict(wrong)}


def relation_scenes(eng, ckpt: str, split: str, n_scenes: int) -> dict:
    """Every relation question of the first n_scenes scenes of a split, by distinct shapes in the scene."""
    items = [(sc, q, a) for sc in shapes.scenes(split, 0, n_scenes) for q, a in shapes.questions(sc)
             if shapes.is_relation(q)]
    preds = eng.answer([shapes.render(sc) for sc, _, _ in items], [q for _, q, _ in items], max_new_tokens=4)
    hits = defaultdict(list)
    for (scene, _, a), p in zip(items, preds):
        hits[f"{len({o.shape for o in scene.objects})} distinct shapes"].append(p.strip() == a)
    return {"bench": "vqa_relations_scenes", "ckpt": ckpt, "split": split, "scenes": n_scenes,
            "questions": len(items), "accuracy": round(sum(sum(v) for v in hits.values()) / len(items), 3),
            "by": {k: [len(v), round(sum(v) / len(v), 3)] for k, v in sorted(hits.items())}}


OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def opposite(eng, ckpt: str, n_scenes: int) -> dict:
    """Relation questions of three-distinct-shape held-out scenes, asked as they are and with the opposite relation."""
    items = []
    for sc in shapes.scenes("heldout", 0, n_scenes):
        if len({o.shape for o in sc.objects}) < 3:
            continue
        for q, a in shapes.questions(sc):
            if shapes.is_relation(q):
                rel = shapes.relation_parts(q)[0]
                items.append((sc, q, q.replace(rel, OPPOSITE[rel], 1), a))
    images = [shapes.render(sc) for sc, *_ in items]
    asked = eng.answer(images, [q for _, q, _, _ in items], max_new_tokens=4)
    flipped = eng.answer(images, [q for _, _, q, _ in items], max_new_tokens=4)
    n = len(items)
    return {"bench": "vqa_relations_opposite", "ckpt": ckpt, "scenes": n_scenes, "questions": n,
            "accuracy": round(sum(p.strip() == a for p, (*_, a) in zip(asked, items)) / n, 3),
            "same_under_opposite": round(sum(p.strip() == f.strip() for p, f in zip(asked, flipped)) / n, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", nargs="+", required=True, help="shipped model names, run folders or checkpoints")
    ap.add_argument("--scenes", type=int, default=400, help="held-out scenes to draw the one-object ones from")
    ap.add_argument("--out", default="")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--relations", action="store_true", help="also the relation questions, by relation and object count")
    ap.add_argument("--relation-scenes", type=int, default=0,
                    help="also every relation question of the first N train and held-out scenes, by distinct shapes")
    ap.add_argument("--opposite", type=int, default=0,
                    help="also ask the relation questions of three-shape held-out scenes among the first N with the "
                         "opposite relation: how often the answer stays the same")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = groups(args.scenes)
    start(args.out)
    for ckpt in args.ckpt:
        eng = load(ckpt, precision="fp32")  # the same answers on every host
        hits = defaultdict(list)
        for k in range(0, len(rows), 90):
            chunk = rows[k:k + 90]
            preds = eng.answer([shapes.render(r[0]) for r in chunk], [r[1] for r in chunk], max_new_tokens=3)
            for (_, _, answer, group), p in zip(chunk, preds):
                hits[group].append(p.strip() == answer)
        line = {"bench": "vqa_binding", "ckpt": str(ckpt), "questions": len(rows),
                **{g: round(sum(v) / len(v), 3) for g, v in sorted(hits.items())}}
        lines = [line] + ([relations(eng, str(ckpt))] if args.relations else [])
        lines += [relation_scenes(eng, str(ckpt), split, args.relation_scenes) for split in ("train", "heldout")
                  if args.relation_scenes]
        lines += [opposite(eng, str(ckpt), args.opposite)] if args.opposite else []
        for line in lines:
            emit(line, args.out)


if __name__ == "__main__":
    main()
