"""Understanding metrics on held-out scenes: VQA exact match and caption exact match.

    from repforce.worlds.metrics import heldout_vqa, vqa_accuracy
    items = heldout_vqa(200)            # fixed (scene, question, answer) triples
    acc = vqa_accuracy(preds, [a for _, _, a in items])

Answers are compared after normalization: lower case, punctuation and articles dropped,
digits written as words ("2" == "two"), whitespace collapsed.
"""

from __future__ import annotations

import re

import numpy as np

from . import shapes

HELDOUT_VQA_START = 1_000_000  # held-out scene indices used for understanding metrics
_ARTICLES = {"a", "an", "the"}
_WORDS = {str(i): w for i, w in enumerate(shapes.NUMBER_WORDS)}


def normalize_answer(text: str) -> str:
    text = re.sub(r"[^\w\s]", " ", text.lower())
    words = [_WORDS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def exact_match(pred: str, truth: str) -> bool:
    return normalize_answer(pred) == normalize_answer(truth)


def accuracy(preds: list[str], truths: list[str]) -> float:
    if len(preds) != len(truths):
        raise ValueError(f"{len(preds)} predictions for {len(truths)} answers")
    if not truths:
        raise ValueError("no answers to score")
    return float(np.mean([exact_match(p, t) for p, t in zip(preds, truths)]))


vqa_accuracy = accuracy
caption_exact_match = accuracy


def heldout_vqa(n: int, canvas: int = 32) -> list[tuple[shapes.Scene, str, str]]:
    """n fixed (scene, question, answer) triples from the held-out stream, one question
    per scene, picked by the scene's seed among all the questions it supports."""
    out = []
    i = 0
    while len(out) < n:
        scene = shapes.sample_scene(shapes.scene_seed("heldout", HELDOUT_VQA_START + i), canvas)
        qa = shapes.questions(scene)
        q, a = qa[np.random.default_rng(scene.seed).integers(len(qa))]
        out.append((scene, q, a))
        i += 1
    return out


def heldout_captions(n: int, canvas: int = 32) -> list[tuple[shapes.Scene, str]]:
    """n fixed (scene, canonical caption) pairs from the held-out stream."""
    scenes = shapes.scenes("heldout", HELDOUT_VQA_START + 500_000, n, canvas)
    return [(s, shapes.caption(s)) for s in scenes]
