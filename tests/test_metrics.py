import pytest

from repforce.worlds import metrics
from repforce.worlds import shapes as world


def test_normalization():
    assert metrics.normalize_answer("The Red circle.") == "red circle"
    assert metrics.exact_match("2", "two")
    assert metrics.exact_match("  Two ", "two")
    assert not metrics.exact_match("three", "two")
    assert metrics.accuracy(["yes", "No", "3"], ["yes", "yes", "three"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        metrics.accuracy(["a"], [])


def test_heldout_sets_are_fixed_and_heldout():
    a, b = metrics.heldout_vqa(50), metrics.heldout_vqa(50)
    assert [(s.seed, q, x) for s, q, x in a] == [(s.seed, q, x) for s, q, x in b]
    assert all(world.split_of_seed(s.seed) == "heldout" for s, _, _ in a)
    kinds = {q.split()[0] + q.split()[1] for _, q, _ in a}
    assert len(kinds) >= 3
    caps = metrics.heldout_captions(10)
    assert all(c == world.caption(s) for s, c in caps)
