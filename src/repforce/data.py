"""Training data: the procedural worlds as a stream, the choice of stream, each rank's slice, and the
worlds' tokenizer.

    tok = build_world_tokenizer("runs/x/tokenizer")                # the BPE of the worlds' text
    stream = make_stream(cfg, tok, Layout.for_model(cfg.model))   # a world, or real data (data.world=mix)
    batch = local_batch(stream, step, cfg.train.batch_size, cfg.train.seed, device)

A world's batch is a pure function of (data seed, step, batch size): sample j of the run is
drawn from its own generator, so resuming at a step replays exactly the same data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import runtime
from .config import DataConfig
from .datasources import MixStream
from .packing import at_positions
from .sequence import CAPTION_QUESTION, REP, Layout, Sample, collate_samples, guidance_drops
from .tokenizer import Tokenizer, train_tokenizer
from .worlds import fashion, shapes, shapeseval


def sample_at(cfg: DataConfig, j: int, gen_fraction: float | None = None) -> Sample:
    """Sample j of a run's stream, drawn from the train half of the seed space."""
    gf = cfg.gen_fraction if gen_fraction is None else gen_fraction
    if cfg.world == "fashion":
        return fashion.sample(cfg, j, gf)
    rng = np.random.default_rng([cfg.seed, j])
    seed = shapes.scene_seed("train", (cfg.seed * 100_000_007 + j) % shapes.HELDOUT_BASE)
    if rng.random() < gf:
        if rng.random() < cfg.prompt_fraction:
            prompt = shapeseval.sample_prompt(rng)
            scene, text = shapeseval.scene_for_prompt(prompt, seed, cfg.canvas), prompt.text
        else:
            scene = shapes.sample_scene(seed, cfg.canvas)
            text = shapes.caption(scene)
        drop_text, drop_rep = guidance_drops(cfg, rng)
        return Sample(True, shapes.render(scene), "" if drop_text else text, "", drop_rep)
    decides = cfg.relation_scenes > 0 and rng.random() < cfg.relation_scenes  # draws nothing when it is 0
    scene = relation_scene(cfg, j, seed) if decides else shapes.sample_scene(seed, cfg.canvas)
    if not decides and rng.random() < cfg.caption_fraction:
        q, a = CAPTION_QUESTION, shapes.caption(scene)
    else:
        qa = shapes.train_questions(scene, rng, cfg.hard_negatives)  # draws nothing when hard_negatives is 0
        if cfg.qa_turns > 1:
            order = list(rng.permutation(len(qa)))
            if decides:  # the questions only their relation decides first, then the rest as drawn
                first = [k for k in order if shapes.is_relation(qa[k][0]) and shapes.relation_decides(scene, qa[k][0])]
                order = first + [k for k in order if k not in first]
            elif cfg.relation_turns:  # up to relation_turns relation questions first, the rest as drawn
                rel = [k for k in order if shapes.is_relation(qa[k][0])][:cfg.relation_turns]
                order = rel + [k for k in order if k not in rel]
            (q, a), *more = [qa[k] for k in order[:cfg.qa_turns]]
            return Sample(False, shapes.render(scene), q, a, more=tuple(more))
        q, a = qa[rng.integers(len(qa))]
    return Sample(False, shapes.render(scene), q, a)


def relation_scene(cfg: DataConfig, j: int, seed: int, tries: int = 200) -> shapes.Scene:
    """The first train-stream scene from `seed` on (seeds a fixed stride apart, a pure function of the
    sample) that has a relation question only its relation decides (about 38% of scenes have one)."""
    for k in range(tries):
        if k:
            seed = shapes.scene_seed("train", (cfg.seed * 100_000_007 + j + k * 1_000_003) % shapes.HELDOUT_BASE)
        scene = shapes.sample_scene(seed, cfg.canvas)
        if any(shapes.is_relation(q) and shapes.relation_decides(scene, q) for q, _ in shapes.questions(scene)):
            return scene
    return scene  # not reached in practice: the last one drawn, with whatever questions it has


class WorldStream:
    """Batches of a procedural world (shapes or Fashion-MNIST), a pure function of the step."""

    def __init__(self, cfg: DataConfig, tok, layout: Layout, gen_fraction: float | None = None):
        self.cfg, self.tok, self.layout = cfg, tok, layout
        self.gen_fraction = cfg.gen_fraction if gen_fraction is None else gen_fraction

    def samples(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> list[Sample]:
        """Samples of `step`; with world > 1, the rank-th of `world` equal slices of them."""
        b = batch_size // world
        first = step * batch_size + rank * b
        return [sample_at(self.cfg, first + i, self.gen_fraction) for i in range(b)]

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
        return collate_samples(self.samples(step, batch_size, rank, world), self.tok, self.layout)


def make_stream(cfg, tok, layout: Layout):
    """The batch source of a run: a procedural world (WorldStream) or the real-data mixture."""
    if cfg.data.world != "mix":
        return WorldStream(cfg.data, tok, layout)
    return MixStream(cfg, tok, layout)


def local_batch(stream, step: int, global_batch: int, seed: int, device: torch.device,
                pack=None) -> dict[str, torch.Tensor]:
    """This rank's slice of the global batch of `step`, with per-sample noise seeds and the loss divisors;
    pack (packing.packer): the slice packed into rows before the divisors are counted.

    Sample j of the run (j = step * global_batch + i) always gets noise seed f(seed, j), so the
    flow noise does not depend on how the batch is split. norm_lm / norm_rep / norm_gen are the
    global counts of text targets, rep predictions and generation samples divided by the world
    size: RFModel divides its loss sums by them (model.py), and FSDP's gradient average over
    ranks then equals the gradient of the global mean.
    """
    r, w = runtime.rank(), runtime.world_size()
    if global_batch % w:
        raise ValueError(f"train.batch_size={global_batch} is not divisible by the {w} ranks")
    b = global_batch // w
    first = step * global_batch + r * b  # index of this rank's first sample in the run
    batch = stream.batch(step, global_batch, r, w)  # samples first .. first + b - 1 of the run
    batch["noise_seed"] = (seed * 1_000_003 + first + torch.arange(b, dtype=torch.long)) % (2**62)
    if pack is not None:
        batch = pack(batch)
    keep = at_positions(batch["is_gen"] & ~batch["drop_rep"], batch.get("doc"))  # (B, L) rep slots with a target
    counts = torch.tensor([(batch["text_targets"] != -100).sum(), ((batch["kind"] == REP) & keep).sum(),
                           batch["is_gen"].sum()], dtype=torch.float32, device=device)
    counts = runtime.all_sum(counts) / w
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    batch["norm_lm"], batch["norm_rep"], batch["norm_gen"] = counts[0], counts[1], counts[2]
    return batch


# ----------------------------------------------------------------------------- the worlds' text


def corpus(n_scenes: int = 4000) -> list[str]:
    """Every kind of text the worlds produce (shapes, from the train stream; Fashion-MNIST's class text)."""
    lines = [CAPTION_QUESTION]
    for scene in shapes.scenes("train", 0, n_scenes):
        lines.append(shapes.caption(scene))
        lines += [f"{q} {a}" for q, a in shapes.questions(scene)]
    for cat in shapeseval.CATEGORIES:
        lines += [text for text, *_ in shapeseval.category_space(cat)]
    return lines + fashion.corpus()


def build_world_tokenizer(out: str | Path, vocab_size: int = 512, n_scenes: int = 4000) -> Tokenizer:
    """The byte-level BPE of the small worlds, trained on `corpus` and saved in `out`."""
    return train_tokenizer(out, corpus(n_scenes), vocab_size)
