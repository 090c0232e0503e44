"""Online quantizer as a pure function and as a module.  Run: pytest tests/test_quantizer.py"""

import pytest
import torch
import torch.nn.functional as F

from repforce.quantizer import (
    OnlineQuantizer,
    assign,
    balance_scores,
    momentum_update,
    perplexity,
    pool2x2,
)

K, D = 32, 16


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_pool2x2_both_layouts():
    x = torch.arange(16.0).view(1, 4, 4, 1)  # (B, h, w, D)
    expected = torch.tensor([[2.5, 4.5], [10.5, 12.5]]).view(1, 2, 2, 1)
    assert torch.equal(pool2x2(x), expected)
    assert torch.equal(pool2x2(x.view(1, 16, 1)), expected.view(1, 4, 1))  # (B, N, D), raster order kept


@pytest.mark.parametrize("balance", ["softmax", "sinkhorn", "none"])
def test_balanced_usage_on_random_data(balance):
    ids = assign(unit(4096, D, seed=1), unit(K, D), 0.5, balance)
    assert perplexity(torch.bincount(ids, minlength=K)) > 0.9 * K


def test_marginals_after_balancing():
    s = unit(256, D, seed=1) @ unit(K, D).T / 0.5
    q = balance_scores(s, "sinkhorn")
    assert torch.allclose(q.sum(0), torch.full((K,), 256 / K), atol=1e-4)  # one step: columns exact
    q = balance_scores(s, "sinkhorn", iters=50)
    assert torch.allclose(q.sum(0), torch.full((K,), 256 / K), atol=1e-4)
    assert torch.allclose(q.sum(1), torch.ones(256), atol=1e-3)  # iterated: rows converge too
    q = balance_scores(s, "softmax")
    assert torch.allclose(q.sum(0), torch.ones(K), atol=1e-5)  # the printed form: softmax over positions


def test_clustered_data_collapses_without_balancing():
    """All features in one tight cone: plain argmax uses ~1 prototype, both balancing steps spread."""
    mu = unit(1, D, seed=2)
    z = F.normalize(mu + 0.05 * torch.randn(1024, D, generator=torch.Generator().manual_seed(3)), dim=1)
    C = unit(K, D)
    ppl = {b: perplexity(torch.bincount(assign(z, C, 0.5, b), minlength=K)) for b in ("none", "softmax", "sinkhorn")}
    assert ppl["none"] < 3
    assert ppl["softmax"] > 8 and ppl["sinkhorn"] > 0.75 * K


def test_momentum_update_against_hand_computation():
    C = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), dim=1)
    z = F.normalize(torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]), dim=1)
    ids = torch.tensor([0, 0, 1])  # prototype 2 gets nothing
    m = 0.9
    new = momentum_update(C, z, ids, m)
    s0 = z[0] + z[1]
    c0 = m * C[0] + (1 - m) * s0 / s0.norm()
    c1 = m * C[1] + (1 - m) * z[2]
    assert torch.allclose(new[0], c0 / c0.norm())
    assert torch.allclose(new[1], c1 / c1.norm())
    assert torch.equal(new[2], C[2])  # unchanged
    assert torch.allclose(new.norm(dim=1), torch.ones(3))


def test_module_updates_only_in_training_and_saves_state():
    q = OnlineQuantizer(K, D, momentum=0.5)
    feats = torch.randn(4, 9, D)
    proto = q.prototypes.clone()
    q.eval()
    ids, stats = q(feats)
    assert ids.shape == (4, 9) and ids.dtype == torch.long and torch.equal(q.prototypes, proto)
    q.train()
    q(feats)
    assert not torch.equal(q.prototypes, proto)
    assert {"prototypes", "unused", "usage"} <= set(q.state_dict())
    assert {"rep_ppl", "rep_used", "rep_dead", "rep_ppl_ema"} <= set(q(feats)[1])


def test_dead_prototypes_are_reseeded_from_live_features():
    q = OnlineQuantizer(4, 2, momentum=0.9, balance="none", dead_after=3)
    with torch.no_grad():
        q.prototypes.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    feats = torch.tensor([[1.0, 0.1], [0.1, 1.0], [1.0, 0.2]])  # never near prototypes 2, 3
    for _ in range(2):
        assert q(feats)[1]["rep_dead"] == 0
    assert q(feats)[1]["rep_dead"] == 2  # third update without features: re-seeded
    live = F.normalize(feats, dim=1)
    for k in (2, 3):
        assert torch.isclose(q.prototypes[k] @ live.T, torch.tensor(1.0)).any()
    assert (q.unused == 0).all()


def test_ids_carry_no_gradient_into_the_encoder():
    encoder = torch.nn.Linear(8, D)
    table = torch.nn.Embedding(K, 4)
    q = OnlineQuantizer(K, D)
    ids, _ = q(encoder(torch.randn(5, 8)))
    assert not ids.requires_grad
    table(ids).sum().backward()
    assert encoder.weight.grad is None and table.weight.grad is not None


def test_bf16_autocast_quantizes_in_fp32():
    q = OnlineQuantizer(K, D)
    feats = torch.randn(64, D)
    ref, _ = q.eval()(feats)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ids, _ = q(feats)
    assert torch.equal(ids, ref)


def test_feature_center_removes_the_shared_component():
    from repforce.quantizer import FeatureCenter

    torch.manual_seed(0)
    shared = torch.randn(16) * 50
    feats = shared + torch.randn(4, 10, 16)  # (B, N, D): one big direction shared by every token
    z = torch.nn.functional.normalize(feats.reshape(-1, 16), dim=-1)
    assert (z @ z.T).mean() > 0.99
    c = FeatureCenter(16, momentum=0.9)
    out = c(feats)
    assert out.shape == feats.shape and c.ready.item() == 1.0
    assert torch.allclose(c.mean, feats.reshape(-1, 16).mean(0))  # first batch: its own mean
    zc = torch.nn.functional.normalize(out.reshape(-1, 16), dim=-1)
    assert (zc @ zc.T).mean().abs() < 0.1
    before = c.mean.clone()
    c(feats + 1.0)
    assert torch.allclose(c.mean, 0.9 * before + 0.1 * (before + 1.0), atol=1e-5)  # momentum update
    c.eval()
    frozen = c.mean.clone()
    c(feats * 3)
    assert torch.equal(c.mean, frozen)  # no update outside training


def _clustered(n_per: int, centers: torch.Tensor, noise: float = 0.05, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = centers.repeat_interleave(n_per, 0)
    return x + noise * torch.randn(x.shape, generator=g)


def test_running_statistics_make_ids_independent_of_the_batch():
    torch.manual_seed(0)
    centers = F.normalize(torch.randn(6, D), dim=1)
    probe = _clustered(4, centers, seed=1)  # (24, D)
    for stats, should_match in (("running", True), ("batch", False)):
        torch.manual_seed(0)
        q = OnlineQuantizer(K, D, stats=stats, init="data", dead_after=0)
        for step in range(20):
            q(_clustered(16, centers, seed=10 + step))
        q.eval()
        alone = q(probe)[0]
        crowd = q(torch.cat([probe, _clustered(40, centers[:1], seed=99)]))[0][: probe.shape[0]]  # one cluster floods
        assert torch.equal(alone, crowd) == should_match, stats
    assert q.col.sum() > 0 or q.stats == "batch"


def test_data_init_starts_every_prototype_at_a_feature_and_keeps_usage_broad():
    torch.manual_seed(0)
    centers = F.normalize(torch.randn(8, D), dim=1)
    first = _clustered(64, centers)  # 512 features >= K
    q = OnlineQuantizer(K, D, init="data", stats="running", momentum=0.99, dead_after=0)
    assert q.seeded.item() == 0
    q(first)
    assert q.seeded.item() == 1
    z = F.normalize(first, dim=1)
    assert torch.isclose((q.prototypes @ z.T).max(dim=1).values, torch.tensor(1.0), atol=0.02).all()
    ids, _ = q.eval()(first)
    assert len(ids.unique()) >= K // 2  # random unit vectors in this setting win far fewer (next assert)
    r = OnlineQuantizer(K, D, init="random", stats="running", momentum=0.99, dead_after=0)
    r(first)
    assert len(r.eval()(first)[0].unique()) < len(ids.unique())
    state = q.state_dict()
    again = OnlineQuantizer(K, D, init="data")
    again.load_state_dict(state)
    again(first)  # a resumed quantizer is not re-seeded
    assert again.seeded.item() == 1


def test_bad_quantizer_settings_name_the_field():
    with pytest.raises(ValueError, match="stats"):
        OnlineQuantizer(K, D, stats="queue")
    with pytest.raises(ValueError, match="init"):
        OnlineQuantizer(K, D, init="kmedoids")


def test_reseeded_prototype_starts_at_the_average_column_mass():
    q = OnlineQuantizer(4, 2, momentum=0.9, balance="softmax", stats="running", dead_after=3)
    with torch.no_grad():
        q.prototypes.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    feats = torch.tensor([[1.0, 0.1], [0.1, 1.0], [1.0, 0.2]])  # never near prototypes 2, 3 (too far to win)
    q.temperature = 0.05
    for _ in range(2):
        q(feats)
    assert q(feats)[1]["rep_dead"] == 2
    assert torch.allclose(q.col[2:], q.col[:2].mean().expand(2))


def test_kmeans_fit_finds_the_clusters_and_then_holds_still():
    torch.manual_seed(0)
    centers = F.normalize(torch.randn(8, D), dim=1)
    feats = _clustered(128, centers)  # 1,024 features around 8 directions
    q = OnlineQuantizer(8, D, init="kmeans", balance="none", momentum=1.0, dead_after=0)
    stats = q.fit(feats)
    assert q.seeded.item() == 1 and stats["used"] == 8
    assert (q.prototypes @ centers.T).max(dim=0).values.min() > 0.95  # every true centre has its prototype
    ids, _ = q.eval()(feats)
    truth = (F.normalize(feats, dim=1) @ centers.T).argmax(dim=1)
    for k in range(8):  # one id per cluster, one cluster per id
        assert len(ids[truth == k].unique()) == 1
    before = q.prototypes.clone()
    q.train()(feats[:100])  # momentum 1: training batches do not move a fitted codebook
    assert torch.equal(q.prototypes, before)
    with pytest.raises(ValueError, match="at least num_codes"):
        OnlineQuantizer(K, D, init="kmeans").fit(feats[:K - 1])
