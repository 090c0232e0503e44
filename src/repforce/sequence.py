"""Training data of the shapes world as model batches: samples, sequence layout, collation.

    stream = ShapesStream(DataConfig(), tok, layout)
    batch = stream.batch(step, batch_size)     # a dict of tensors, the model's batch contract

Layouts (one image per sample, right-padded to a common length L):

    generation      [BOS prompt][BOI][M rep slots][N gen slots][EOI]
    understanding   [BOS][IMG_START][E encoder slots][IMG_END][question][answer][EOS]

`kind` marks every position (0 pad, 1 text, 2 image-encoder slot, 3 rep slot, 4 gen slot);
`text_targets[i]` is the token position i must predict (-100: no LM loss). A generation
prompt is a condition, not a target. Text dropping for guidance is done here (the prompt
becomes empty: BOS, BOI); rep dropping is a flag the model applies.

A batch is a pure function of (data seed, step, batch size): sample j of the run is drawn
from its own generator, so resuming at a step replays exactly the same data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import shapeseval, world

PAD, TEXT, ENC, REP, GEN = 0, 1, 2, 3, 4  # position kinds


@dataclass(frozen=True)
class DataConfig:
    world: str = "shapes"  # data source: "shapes" or "fashion" (Fashion-MNIST, see fashion.py)
    fashion_root: str = "/usr/share/datasets/fashion-mnist"  # folder of the Fashion-MNIST IDX files
    fashion_pairs: float = 0.0  # Fashion-MNIST: share of two-item composites ("a bag to the left of a sandal")
    canvas: int = 32  # image side, pixels
    channels: int = 3  # 3: RGB (Fashion-MNIST's gray replicated); 1: gray, Fashion-MNIST only (= model.image_channels)
    gen_fraction: float = 0.5  # share of generation samples in a batch (the vlm variant uses 0)
    prompt_fraction: float = 0.5  # share of generation captions written as ShapesEval-style prompts
    caption_fraction: float = 0.25  # share of understanding samples that ask for the full caption
    drop_text: float = 0.1  # probability of an empty prompt (guidance)
    drop_rep: float = 0.1  # probability of a dropped rep sequence (guidance)
    seed: int = 0  # data seed: which slice of the train stream a run sees


@dataclass(frozen=True)
class Layout:
    """How many slots each image kind takes in a sequence."""

    n_enc: int  # image-encoder tokens of an understanding sample
    n_rep: int  # rep slots of a generation sample (0 for variants without rep tokens)
    n_gen: int  # gen slots (pixel patches or latent tokens)


@dataclass
class Sample:
    is_gen: bool
    image: np.ndarray  # (H, W, C) uint8, C = DataConfig.channels
    prompt: str  # generation: the prompt ("" when dropped); understanding: the question
    answer: str  # understanding: the answer; generation: ""
    drop_rep: bool = False


def sample_at(cfg: DataConfig, j: int, gen_fraction: float | None = None) -> Sample:
    """Sample j of a run's stream, drawn from the train half of the seed space."""
    gf = cfg.gen_fraction if gen_fraction is None else gen_fraction
    if cfg.world == "fashion":
        from . import fashion

        return fashion.sample(cfg, j, gf)
    rng = np.random.default_rng([cfg.seed, j])
    seed = world.scene_seed("train", (cfg.seed * 100_000_007 + j) % world.HELDOUT_BASE)
    if rng.random() < gf:
        if rng.random() < cfg.prompt_fraction:
            prompt = shapeseval.sample_prompt(rng)
            scene, text = shapeseval.scene_for_prompt(prompt, seed, cfg.canvas), prompt.text
        else:
            scene = world.sample_scene(seed, cfg.canvas)
            text = world.caption(scene)
        drop_text, drop_rep = rng.random() < cfg.drop_text, rng.random() < cfg.drop_rep
        return Sample(True, world.render(scene), "" if drop_text else text, "", drop_rep)
    scene = world.sample_scene(seed, cfg.canvas)
    if rng.random() < cfg.caption_fraction:
        q, a = world.caption_question(), world.caption(scene)
    else:
        qa = world.questions(scene)
        q, a = qa[rng.integers(len(qa))]
    return Sample(False, world.render(scene), q, a)


def gen_prefix(tok, prompt: str) -> list[int]:
    """Token ids of a generation prompt up to and including BOI (the sampler uses it too)."""
    return [tok.bos_id, *tok.encode(prompt), tok.boi_id]


def und_prefix(tok, layout: Layout, question: str) -> tuple[list[int], list[int]]:
    """Ids and kinds of an understanding prompt up to the end of the question."""
    ids = [tok.bos_id, tok.img_start_id] + [0] * layout.n_enc + [tok.img_end_id] + tok.encode(question)
    kinds = [TEXT, TEXT] + [ENC] * layout.n_enc + [TEXT] * (len(ids) - layout.n_enc - 2)
    return ids, kinds


def layout_of(s: Sample, tok, layout: Layout) -> tuple[list[int], list[int], list[int]]:
    """(tokens, kinds, targets) of one sample, unpadded."""
    if s.is_gen:
        ids = gen_prefix(tok, s.prompt)
        kinds = [TEXT] * len(ids) + [REP] * layout.n_rep + [GEN] * layout.n_gen + [TEXT]
        ids = ids + [0] * (layout.n_rep + layout.n_gen) + [tok.eoi_id]
        return ids, kinds, [-100] * len(ids)
    ids, kinds = und_prefix(tok, layout, s.prompt)
    answer = tok.encode(s.answer) + [tok.eos_id]
    targets = [-100] * (len(ids) - 1) + answer + [-100]  # position i predicts ids[i + 1]
    return ids + answer, kinds + [TEXT] * len(answer), targets


def collate(samples: list[Sample], tok, layout: Layout, multiple: int = 8) -> dict[str, torch.Tensor]:
    """Samples -> the batch contract (see the module docstring), padded to a multiple of 8."""
    rows = [layout_of(s, tok, layout) for s in samples]
    length = max(len(r[0]) for r in rows)
    length = -(-length // multiple) * multiple
    B = len(samples)
    tokens = torch.zeros(B, length, dtype=torch.long)
    kind = torch.zeros(B, length, dtype=torch.long)
    targets = torch.full((B, length), -100, dtype=torch.long)
    for b, (ids, kinds, tgt) in enumerate(rows):
        n = len(ids)
        tokens[b, :n] = torch.tensor(ids)
        kind[b, :n] = torch.tensor(kinds)
        targets[b, :n] = torch.tensor(tgt)
    tokens[kind != TEXT] = 0
    images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, 3, H, W)
    return {
        "tokens": tokens,
        "kind": kind,
        "text_targets": targets,
        "images": images,
        "gen_x": images,
        "is_gen": torch.tensor([s.is_gen for s in samples]),
        "drop_rep": torch.tensor([s.drop_rep for s in samples]),
    }


class ShapesStream:
    """Batches of the shapes world, a pure function of the step."""

    def __init__(self, cfg: DataConfig, tok, layout: Layout, gen_fraction: float | None = None):
        self.cfg, self.tok, self.layout = cfg, tok, layout
        self.gen_fraction = cfg.gen_fraction if gen_fraction is None else gen_fraction

    def samples(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> list[Sample]:
        """Samples of `step`; with world > 1, the rank-th of `world` equal slices of them."""
        b = batch_size // world
        first = step * batch_size + rank * b
        return [sample_at(self.cfg, first + i, self.gen_fraction) for i in range(b)]

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
        return collate(self.samples(step, batch_size, rank, world), self.tok, self.layout)
