"""optim.name=muon: Muon on the backbone's hidden matrices, AdamW on the rest, as one optimizer that resumes."""

import json

import pytest
import torch
from conftest import tiny_run

from repforce import checkpoint
from repforce import config as C
from repforce.model import RFModel
from repforce.train import train
from repforce.trainable import MuonAdamW, make_optimizer, orthogonalize


def test_its_adamw_groups_step_exactly_as_torch_adamw():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(8, 5))
    b = torch.nn.Parameter(a.detach().clone())
    ours = MuonAdamW([{"params": [a], "weight_decay": 0.1, "muon": False}], lr=1e-2, betas=(0.9, 0.95))
    ref = torch.optim.AdamW([{"params": [b], "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95))
    for _ in range(6):
        g = torch.randn(8, 5)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(64, 24), (24, 64), (96, 32)])
def test_orthogonalize_brings_every_singular_value_near_one(shape):
    torch.manual_seed(0)
    k = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], k))
    v, _ = torch.linalg.qr(torch.randn(shape[1], k))
    g = u @ torch.diag(torch.logspace(-1.5, 0, k)) @ v.T  # singular values from 0.03 to 1
    out = orthogonalize(g)
    s = torch.linalg.svdvals(out)
    assert out.shape == g.shape
    assert s.min() > 0.6 and s.max() < 1.2, s  # the quintic iteration's band (about 0.7 to 1.15), not exactly 1


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    cfg = C.validate(tiny_run("pixel_rf", "optim.name=muon"))
    model = RFModel(cfg.model)
    opt = make_optimizer(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.param_groups if g["muon"] for p in g["params"]}
    assert muon and all(n.startswith("backbone.layers.") and "norm" not in n for n in muon)
    assert "backbone.layers.0.self_attn.q_proj.weight" in muon and "backbone.layers.0.mlp.experts.1.up_proj.weight" in muon
    rest = {names[id(p)] for g in opt.param_groups if not g["muon"] for p in g["params"]}
    assert {"backbone.embed_tokens.weight", "lm_head.weight", "gen_embed.weight"} <= rest
    assert isinstance(make_optimizer(model, tiny_run("pixel_rf")), torch.optim.AdamW)  # the default is unchanged


def test_a_muon_run_learns_and_resumes_bit_for_bit(tmp_path):
    cfg = tiny_run("pixel_rf", "optim.name=muon", steps=10, log_every=1, ckpt_every=5)
    straight, halves = tmp_path / "a", tmp_path / "b"
    train(cfg, straight, progress=False)
    train(C.override(cfg, ["train.steps=5"]), halves, progress=False)
    train(cfg, halves, resume=True, progress=False)

    def rows(run):
        return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if '"step"' in x]

    a, b = rows(straight), rows(halves)
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and len(a) == 10
    assert a[-1]["loss"] < a[0]["loss"]
    sa, _ = checkpoint.read(straight)
    sb, _ = checkpoint.read(halves)
    assert any("momentum_buffer" in s for s in sa["optim"]["state"].values())  # the Muon groups kept momentum
    for k, v in sa["ema"].items():
        assert torch.equal(v, sb["ema"][k]), k


def test_an_unknown_optimizer_is_named():
    with pytest.raises(C.ConfigError, match="optim.name='sgd'"):
        C.validate(tiny_run("pixel_rf", "optim.name=sgd"))
