"""Packed rows (packing.py): the layout a packer writes, and the losses and gradients of a packed batch against
the same samples unpacked, at one image size and at several.  Run: pytest tests/test_packing.py"""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import V, tiny_model, tiny_run

from repforce import config as C
from repforce import packing
from repforce.model import RFModel
from repforce.sequence import ENC, GEN, PAD, REP, TEXT

BOS, BOI, EOI, IMG_START, IMG_END, EOS = 1, 2, 3, 4, 5, 6  # special ids of the test vocabulary


def sample_rows(cfg, what: str, side: int, seed: int):
    """(tokens, kinds, targets) of one sample whose image has this side; the same seed gives the same text."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(7, V, (2 + seed % 4,), generator=g).tolist()
    slots = packing.slots_at(cfg, side)
    if what == "gen":
        toks = [BOS, *text, BOI] + [0] * (slots[REP] + slots[GEN]) + [EOI]
        kinds = [TEXT] * (len(text) + 2) + [REP] * slots[REP] + [GEN] * slots[GEN] + [TEXT]
        return toks, kinds, [-100] * len(toks)
    question, answer = text[:2], text[2:] or [9]
    toks = [BOS, IMG_START] + [0] * slots[ENC] + [IMG_END] + question + answer + [EOS]
    kinds = [TEXT, TEXT] + [ENC] * slots[ENC] + [TEXT] * (2 + len(question) + len(answer))
    targets = [-100] * len(toks)
    for j in range(len(toks) - len(answer) - 2, len(toks) - 1):  # the last question token predicts the first answer
        targets[j] = toks[j + 1]
    return toks, kinds, targets


def unpacked(cfg, samples, images, side: int, seeds, drop):
    """An unpacked batch (sequence.py contract) of samples [(what, seed)] whose images have this side."""
    rows = [sample_rows(cfg, what, side, seed) for what, seed in samples]
    L = max(len(r[0]) for r in rows) + 3
    pad = lambda xs, v: xs + [v] * (L - len(xs))  # noqa: E731
    return {"tokens": torch.tensor([pad(r[0], 0) for r in rows]), "kind": torch.tensor([pad(r[1], PAD) for r in rows]),
            "text_targets": torch.tensor([pad(r[2], -100) for r in rows]), "images": images, "gen_x": images,
            "is_gen": torch.tensor([w == "gen" for w, _ in samples]), "drop_rep": torch.tensor(drop),
            "noise_seed": torch.tensor(seeds)}


def norms(batch):
    """The loss divisors data.local_batch gives a batch of one rank."""
    keep = packing.at_positions(batch["is_gen"] & ~batch["drop_rep"], batch.get("doc"))
    return {"norm_lm": (batch["text_targets"] != -100).sum().float(),
            "norm_rep": ((batch["kind"] == REP) & keep).sum().float(), "norm_gen": batch["is_gen"].sum().float()}


def losses_and_grads(model, batch):
    model = copy.deepcopy(model)  # the quantizer moves in training mode: every call starts from the same state
    torch.manual_seed(1)
    out = model(batch)
    out["loss"].backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


SAMPLES = [("gen", 0), ("und", 1), ("gen", 2), ("und", 3), ("gen", 4), ("gen", 5), ("und", 6), ("gen", 7)]
DROP = [False, False, True, False, False, False, False, False]


# ---------------------------------------------------------------- layout


def test_first_fit_puts_every_sample_once_within_capacity():
    lengths = [30, 5, 17, 40, 12, 3, 25, 8]
    rows = packing.first_fit(lengths, 40)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 40 for r in rows)
    assert len(rows) == 4 and all(r == sorted(r) for r in rows)  # 140 tokens: 4 rows of 40 is the least


def test_packed_rows_hold_each_sample_whole_with_positions_from_zero():
    cfg = tiny_model()
    images = torch.rand(len(SAMPLES), 3, 16, 16) * 2 - 1
    batch = unpacked(cfg, SAMPLES, images, 16, list(range(100, 108)), DROP)
    packed = packing.pack_batch(batch, cfg, 64)
    R, T = packed["kind"].shape
    assert T == 64 and R < len(SAMPLES)
    order = packed["noise_seed"] - 100  # new sample j is old sample order[j]
    assert sorted(order.tolist()) == list(range(len(SAMPLES)))
    assert torch.equal(packed["images"], images[order]) and torch.equal(packed["is_gen"], batch["is_gen"][order])
    flat_doc = packed["doc"][packed["doc"] >= 0]
    assert torch.equal(flat_doc, flat_doc.sort().values)  # samples in index order, row by row
    for j, i in enumerate(order.tolist()):
        at = packed["doc"] == j
        r = int(at.nonzero()[0, 0])
        assert at.sum() == at[r].sum()  # one row, contiguous
        span = at[r].nonzero()[:, 0]
        assert torch.equal(span, torch.arange(int(span[0]), int(span[0]) + len(span)))
        assert torch.equal(packed["positions"][r, span], torch.arange(len(span)))
        own = batch["kind"][i] != PAD
        for k in ("tokens", "kind", "text_targets"):
            assert torch.equal(packed[k][r, span], batch[k][i][own]), k
    assert ((packed["kind"] == PAD) == (packed["doc"] < 0)).all()
    with pytest.raises(ValueError, match="train.tokens_per_rank=16"):
        packing.pack_batch(batch, cfg, 16)


def test_sides_are_drawn_per_sample_whatever_the_batch():
    a = packing.draw_sides({"noise_seed": torch.arange(40)}, (8, 16, 24, 32))
    b = packing.draw_sides({"noise_seed": torch.arange(20, 40)}, (8, 16, 24, 32))
    assert torch.equal(a[20:], b) and set(a.tolist()) == {8, 16, 24, 32}


# ---------------------------------------------------------------- losses: packed == unpacked


VLM_2D = {"image_rope": "2d", "und_rope": "2d"}  # encoder tokens on their grid too


@pytest.mark.parametrize("variant,fields", [("pixel_rf", {}), ("pixel_rf", {"image_rope": "2d", "pos_init": "sincos"}),
                                            ("pixel_repa", {}), ("vlm", {}), ("vlm", VLM_2D), ("pixel_cont", {})])
def test_packed_losses_and_gradients_equal_unpacked(variant, fields):
    """One image size: the same samples (same noise seeds) unpacked and packed into rows of 64 tokens, in
    training mode (the quantizer balances and moves), fp32: every loss and every gradient agree."""
    torch.manual_seed(0)
    model = RFModel(tiny_model(variant, **fields)).train()
    samples = [s for s in SAMPLES if s[0] == "und"] if variant == "vlm" else SAMPLES
    images = torch.rand(len(samples), 3, 16, 16) * 2 - 1
    batch = unpacked(model.cfg, samples, images, 16, list(range(100, 100 + len(samples))), DROP[:len(samples)])
    # pixel_cont draws its per-token rep noise from the global stream, in sample order: keep that order (one row)
    packed = packing.pack_batch(batch, model.cfg, 512 if variant == "pixel_cont" else 64)
    if variant in ("pixel_rf", "pixel_repa"):  # several rows, samples reordered by the packer
        assert packed["kind"].shape[0] > 1 and not packed["noise_seed"].diff().ge(0).all()
    batch.update(norms(batch))
    packed.update(norms(packed))
    (a, ga), (b, gb) = losses_and_grads(model, batch), losses_and_grads(model, packed)
    assert a.keys() == b.keys() and ga.keys() == gb.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-5), (k, a[k], b[k])
    for n in ga:
        assert torch.allclose(ga[n], gb[n], atol=1e-5, rtol=1e-4), n


@pytest.mark.parametrize("variant,fields", [("pixel_rf", {}), ("pixel_rf", {"image_rope": "2d", "pos_init": "sincos"}),
                                            ("pixel_repa", {}), ("vlm", {}), ("vlm", VLM_2D)])
def test_packed_rows_of_several_image_sizes_equal_each_size_unpacked(variant, fields):
    """Sides 8, 16, 24, 32 px in rows of 128 tokens (vlm: 64) against one unpacked batch per side (the images resized the
    same way), the loss divisors those of the whole batch, so the unpacked losses and gradients add up to the
    packed ones. Eval mode and no balancing: the quantizer's ids then do not depend on which samples share a
    batch (in training the packed batch balances and counts all sizes at once, as one unpacked batch would)."""
    torch.manual_seed(0)
    cfg = tiny_model(variant, image_size=32, gen_size=32, rep_balance="none", **fields)
    model = RFModel(cfg).eval()
    samples = [s for s in SAMPLES if s[0] == "und"] if variant == "vlm" else SAMPLES
    n = len(samples)
    images, seeds = torch.rand(n, 3, 32, 32) * 2 - 1, list(range(100, 100 + n))
    sides = torch.tensor([8, 16, 24, 32, 16, 8, 24, 32][:n])
    full = unpacked(cfg, samples, images, 32, seeds, DROP[:n])
    packed = packing.pack_batch(full, cfg, 64 if variant == "vlm" else 128, sides)
    assert packed["kind"].shape[0] > 1
    divisors = norms(packed)
    packed.update(divisors)
    got, got_g = losses_and_grads(model, packed)
    want, want_g = {}, {}
    for s in sides.unique().tolist():
        at = (sides == s).nonzero()[:, 0].tolist()
        small = images[at] if s == 32 else F.interpolate(images[at], size=(s, s), mode="bilinear", antialias=True)
        part = unpacked(cfg, [samples[i] for i in at], small, s, [seeds[i] for i in at], [DROP[i] for i in at])
        part.update(divisors, image_side=torch.full((len(at),), s))
        out, grads = losses_and_grads(model, part)
        for k in ("loss", "loss_lm", "loss_rep", "loss_fm", "loss_repa"):
            if k in out:
                want[k] = want.get(k, 0) + out[k].detach()
        for name, g in grads.items():
            want_g[name] = want_g.get(name, 0) + g
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-5, rtol=1e-5), (k, got[k], want[k])
    assert got_g.keys() == want_g.keys()
    for name in got_g:
        assert torch.allclose(got_g[name], want_g[name], atol=1e-5, rtol=1e-4), name


# ---------------------------------------------------------------- config and a run


def test_packing_config_is_checked_naming_the_field():
    with pytest.raises(C.ConfigError, match="train.image_sides"):
        C.validate(tiny_run("pixel_rf", "train.image_sides=16,32"))  # no packing
    with pytest.raises(C.ConfigError, match="train.image_sides='12'"):
        C.validate(tiny_run("pixel_rf", "train.tokens_per_rank=512", "train.image_sides=12"))  # not a multiple of 8
    with pytest.raises(C.ConfigError, match="train.image_sides='64'"):
        C.validate(tiny_run("pixel_rf", "train.tokens_per_rank=512", "train.image_sides=64"))  # above image_size
    with pytest.raises(C.ConfigError, match="train.attention"):
        C.validate(tiny_run("pixel_rf", "train.attention=flash"))
    C.validate(tiny_run("pixel_rf", "train.tokens_per_rank=512", "train.image_sides=16,24,32"))


def test_a_packed_run_of_several_sizes_trains(tmp_path, world_tok):
    from repforce.train import train

    run = tmp_path / "packed"
    world_tok.save(run / "tokenizer")  # the session's small tokenizer, not a fresh full one
    summary = train(tiny_run("pixel_rf", "train.tokens_per_rank=512", "train.image_sides=16,24,32", steps=2,
                             log_every=1, batch_size=8), run, progress=False)
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if '"step"' in line]
    assert summary["step"] == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert {"loss_lm", "loss_rep", "loss_fm"} <= rows[-1].keys()
