"""The batch contract between data and model: position kinds, sequence layouts, collation.

    layout = Layout.for_model(cfg.model)
    batch = collate([rows(tok, layout, s.is_gen, s.prompt, [(s.prompt, s.answer)]) ...], images, is_gen, drop_rep)

Layouts (one image per sample, right-padded to a common length L):

    generation      [BOS prompt][BOI][M rep slots][N gen slots][EOI]
    understanding   [BOS][IMG_START][E encoder slots][IMG_END] q1 a1 EOS q2 a2 EOS ...

`kind` marks every position (PAD, TEXT, ENC, REP, GEN below); `text_targets[i]` is the
token position i must predict (-100: no LM loss): the answers and their EOS. A generation
prompt is a condition, not a target. Text dropping for guidance is the data's (the prompt
becomes empty: BOS, BOI); rep dropping is a flag the model applies. Every data source
(the worlds of data.py, the real data of datasources.py) and the inference engine build
their sequences here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

PAD, TEXT, ENC, REP, GEN = 0, 1, 2, 3, 4  # position kinds
CAPTION_QUESTION = "describe the image."  # the question that asks for a caption, in every world


@dataclass(frozen=True)
class Layout:
    """How many slots each image kind takes in a sequence."""

    n_enc: int  # image-encoder tokens of an understanding sample
    n_rep: int  # rep slots of a generation sample (0 for variants without rep tokens)
    n_gen: int  # gen slots (pixel patches or latent tokens)

    @staticmethod
    def for_model(m) -> "Layout":
        """The layout of a ModelConfig's sequences."""
        return Layout(m.n_enc, m.n_rep if m.rep_slots else 0, m.n_gen)


@dataclass
class Sample:
    is_gen: bool
    image: np.ndarray  # (H, W, C) uint8, C = DataConfig.channels
    prompt: str  # generation: the prompt ("" when dropped); understanding: the question
    answer: str  # understanding: the answer; generation: ""
    drop_rep: bool = False
    more: tuple[tuple[str, str], ...] = ()  # understanding: further (question, answer) turns on the same image


def guidance_drops(data, rng) -> tuple[bool, bool]:
    """(drop the prompt, drop the rep tokens) of a generation sample: each on its own with
    data.drop_text / data.drop_rep, and both together with data.drop_both on top, so that the
    pixel-guidance branch (both dropped) is trained on about drop_both of the samples rather
    than drop_text * drop_rep (1% at 0.1 each). No extra draw when drop_both is 0 (older runs)."""
    drop_text, drop_rep = bool(rng.random() < data.drop_text), bool(rng.random() < data.drop_rep)
    if data.drop_both and rng.random() < data.drop_both:
        drop_text = drop_rep = True
    return drop_text, drop_rep


def gen_prefix(tok, prompt: str, max_tokens: int | None = None) -> list[int]:
    """Token ids of a generation prompt up to and including BOI (the sampler uses it too)."""
    return [tok.bos_id, *tok.encode(prompt)[:max_tokens], tok.boi_id]


def und_prefix(tok, layout: Layout, question: str) -> tuple[list[int], list[int]]:
    """Ids and kinds of an understanding prompt up to the end of the question."""
    ids = [tok.bos_id, tok.img_start_id] + [0] * layout.n_enc + [tok.img_end_id] + tok.encode(question)
    kinds = [TEXT, TEXT] + [ENC] * layout.n_enc + [TEXT] * (len(ids) - layout.n_enc - 2)
    return ids, kinds


def rows(tok, layout: Layout, is_gen: bool, prompt: str | None, turns=(), max_tokens: int | None = None):
    """(tokens, kinds, targets) of one sample, unpadded: a generation prompt, or understanding turns
    [(question, answer), ...]. With max_tokens, a prompt is cut to it; turns that do not fit are
    dropped, and a first turn that does not fit alone is cut to fit."""
    if is_gen:
        ids = gen_prefix(tok, prompt or "", max_tokens)
        kinds = [TEXT] * len(ids) + [REP] * layout.n_rep + [GEN] * layout.n_gen + [TEXT]
        ids = ids + [0] * (layout.n_rep + layout.n_gen) + [tok.eoi_id]
        return ids, kinds, [-100] * len(ids)
    ids = [tok.bos_id, tok.img_start_id] + [0] * layout.n_enc + [tok.img_end_id]
    kinds = [TEXT, TEXT] + [ENC] * layout.n_enc + [TEXT]
    own = [-100] * len(ids)  # own[i] = ids[i] where ids[i] is an answer token (a target), else -100
    budget = max_tokens
    for n, (q, a) in enumerate(turns):
        q_ids, a_ids = tok.encode(q), tok.encode(a) + [tok.eos_id]
        if budget is not None:
            if len(q_ids) + len(a_ids) > budget:
                if n:
                    break  # later turns that do not fit are dropped; the first one is cut to fit
                q_ids = q_ids[:budget // 2]
                a_ids = a_ids[:budget - len(q_ids)]
            budget -= len(q_ids) + len(a_ids)
        ids += q_ids + a_ids
        kinds += [TEXT] * (len(q_ids) + len(a_ids))
        own += [-100] * len(q_ids) + a_ids
    return ids, kinds, own[1:] + [-100]  # position i predicts ids[i + 1]


def collate(samples_rows: list[tuple], images: np.ndarray, is_gen: list[bool], drop_rep: list[bool],
            multiple: int = 8) -> dict[str, torch.Tensor]:
    """Rows of `rows` and their uint8 images (B, H, W, C) -> the batch contract, padded to a multiple of 8."""
    length = max(len(r[0]) for r in samples_rows)
    length = -(-length // multiple) * multiple
    B = len(samples_rows)
    tokens = torch.zeros(B, length, dtype=torch.long)
    kind = torch.zeros(B, length, dtype=torch.long)
    targets = torch.full((B, length), -100, dtype=torch.long)
    for b, (ids, kinds, tgt) in enumerate(samples_rows):
        n = len(ids)
        tokens[b, :n] = torch.tensor(ids)
        kind[b, :n] = torch.tensor(kinds)
        targets[b, :n] = torch.tensor(tgt)
    tokens[kind != TEXT] = 0
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, C, H, W) in [-1, 1]
    return {
        "tokens": tokens,
        "kind": kind,
        "text_targets": targets,
        "images": x,
        "gen_x": x,
        "is_gen": torch.tensor(is_gen),
        "drop_rep": torch.tensor(drop_rep),
    }


def collate_samples(samples: list[Sample], tok, layout: Layout) -> dict[str, torch.Tensor]:
    """Samples of the worlds (a question and its answer, then any further turns) -> the batch contract."""
    r = [rows(tok, layout, s.is_gen, s.prompt, [] if s.is_gen else [(s.prompt, s.answer), *s.more]) for s in samples]
    return collate(r, np.stack([s.image for s in samples]), [s.is_gen for s in samples],
                   [s.drop_rep for s in samples])
