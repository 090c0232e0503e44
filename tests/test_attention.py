"""Attention without a dense mask (attention.py): the BlockMask of a layout, materialized, against the dense
mask's rule, and FlexAttention's forward against SDPA's on the same model. FlexAttention has no CPU backward
in this torch build, so gradients under it are a GPU check; its CPU forward is the eager, unfused one.
Run: pytest tests/test_attention.py"""

import pytest
import torch
from conftest import tiny_model
from test_packing import DROP, SAMPLES, unpacked

from repforce import attention, packing
from repforce.model import RFModel, attention_mask
from repforce.sequence import PAD


def layouts():
    """(kind, positions, doc) of packed rows of several image sizes, of one size, and of unpacked rows."""
    cfg = tiny_model(image_size=32, gen_size=32)
    images, seeds = torch.rand(len(SAMPLES), 3, 32, 32) * 2 - 1, list(range(len(SAMPLES)))
    full = unpacked(cfg, SAMPLES, images, 32, seeds, DROP)
    mixed = packing.pack_batch(full, cfg, 160, torch.tensor([8, 16, 24, 32, 16, 8, 24, 32]))
    same = packing.pack_batch(full, cfg, 256)
    L = full["kind"].shape[1]
    return [(p["kind"], p["positions"], p["doc"]) for p in (mixed, same)] + [
        (full["kind"], torch.arange(L).expand_as(full["kind"]), None)]


def dense_rule(kind, pos, doc):
    """may_attend over every (query, key) pair: (B, L, L)."""
    q, k = (lambda x: None if x is None else x[:, :, None]), (lambda x: None if x is None else x[:, None, :])
    return attention.may_attend(q(kind), q(pos), q(doc), k(kind), k(pos), k(doc))


@pytest.mark.parametrize("block", [8, 16])
def test_block_tables_skip_only_empty_blocks_and_call_full_only_full_ones(block):
    for kind, pos, doc in layouts():
        B, L = kind.shape
        dense = dense_rule(kind, pos, doc) & (kind != PAD)[:, :, None]  # padding queries: output unused
        partial, full = attention.block_tables(kind, pos, doc, block)
        grow = lambda x: x.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :L, :L]  # noqa: E731
        assert not (dense & ~grow(partial | full)).any()  # no visible key in a skipped block
        real = (kind != PAD)[:, :, None] & (kind != PAD)[:, None, :]
        assert (dense | ~grow(full) | ~real).all()  # every real pair of a full block is visible
        assert not (partial & full).any()
        if doc is not None:  # a packed row has blocks of every sort
            assert full.any() and partial.any() and (~partial & ~full).any()


def test_block_mask_materializes_to_the_dense_mask():
    from torch.nn.attention.flex_attention import create_mask

    for kind, pos, doc in layouts():
        B, L = kind.shape
        bm = attention.block_mask(kind, pos, doc, block=16)
        partial, full = attention.block_tables(kind, pos, doc, 16)
        assert torch.equal(bm.to_dense()[:, 0].bool(), partial | full)
        mod = create_mask(bm.mask_mod, B, 1, L, L, device="cpu")[:, 0]  # (B, L, L) the mask_mod everywhere
        dense = attention_mask(kind, pos, doc=doc)[:, 0]  # the SDPA path's mask
        real = kind != PAD
        assert torch.equal(mod[real], dense[real])  # padding queries: the dense mask's fallback differs, unused


@pytest.mark.parametrize("variant,fields", [("pixel_rf", {}), ("pixel_rf", {"image_rope": "2d"}), ("pixel_repa", {})])
def test_flex_forward_equals_sdpa(variant, fields, monkeypatch):
    """Same model, same packed batch of several sizes (and an unpacked one): FlexAttention on the BlockMask
    (16-position blocks, so empty, full and partial blocks all occur) gives SDPA's hidden states and losses.
    The eager CPU form applies the mask_mod at every pair and does not skip blocks: the block tables are
    checked above, and by benchmarks/attention_memory.py through the compiled (block-skipping) kernel."""
    monkeypatch.setattr(attention, "BLOCK", 16)
    torch.manual_seed(0)
    model = RFModel(tiny_model(variant, image_size=32, gen_size=32, **fields)).eval()
    images, seeds = torch.rand(len(SAMPLES), 3, 32, 32) * 2 - 1, list(range(len(SAMPLES)))
    full = unpacked(model.cfg, SAMPLES, images, 32, seeds, DROP)
    packed = packing.pack_batch(full, model.cfg, 160, torch.tensor([8, 16, 24, 32, 16, 8, 24, 32]))
    for batch in (packed, full):
        got = {}
        for kind in ("sdpa", "flex"):
            model.set_attention(kind)
            with torch.no_grad():
                h, aux = model.build_inputs(batch)
                hidden = model.forward_hidden(h, batch["kind"], aux["positions"], doc=aux["doc"])
                got[kind] = hidden[batch["kind"] != PAD], model(batch)
        assert torch.allclose(got["sdpa"][0], got["flex"][0], atol=1e-5)
        for k, v in got["sdpa"][1].items():
            assert torch.allclose(v, got["flex"][1][k], atol=1e-5), k
    model.set_attention("sdpa")


def test_flex_training_is_refused_on_cpu():
    from conftest import tiny_run

    from repforce import config as C

    with pytest.raises(C.ConfigError, match="train.attention='flex'"):
        C.validate(tiny_run("pixel_rf", "train.attention=flex"))
