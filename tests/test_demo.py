import json

import pytest

from repforce.study.demo import demo
from repforce.train import RunError


def test_demo_writes_a_report(tmp_path):
    out = tmp_path / "demo"
    s = demo(out, minutes=0.15, preset="tiny", per_category=1, vqa_n=10, progress=False)
    html = (out / "report.html").read_text()
    for section in ("Training", "ShapesEval", "Understanding", "Gallery", "Reproduce", "Resolved config"):
        assert f">{section}<" in html or section in html
    assert html.count("data:image/png;base64,") >= 1 + 2 * 18  # curves + 18 gallery images with rep maps
    assert s["steps"]["vlm"] > 0 and s["steps"]["pixel_rf"] > 0
    assert set(s["shapeseval"]) >= {"overall", "counting", "position"}
    assert json.loads((out / "summary.json").read_text())["report"] == str(out / "report.html")
    assert len(list((out / "shapeseval").glob("*/samples/*.png"))) == 6 * 2
    # scored without guidance too, from other images
    assert set(s["shapeseval_unguided"]) == set(s["shapeseval"])
    assert len(list((out / "shapeseval_unguided").glob("*/samples/*.png"))) == 6 * 2
    assert "without guidance (weights 1, in shapeseval_unguided/) overall" in html
    with pytest.raises(RunError, match="already exists"):
        demo(out, minutes=0.1, preset="tiny", progress=False)


def test_demo_packs_the_shapes_world_into_rows_that_hold_its_longest_samples():
    """The shapes demo packs samples into rows of PACK["shapes"] positions; a sample longer than a row would stop
    the run (packing.pack_batch), so the rows must hold the longest the stream draws, with room to spare."""
    from repforce import checkpoint, data
    from repforce.config import validate
    from repforce.presets import preset
    from repforce.sequence import PAD, Layout
    from repforce.study.demo import PACK
    from repforce.tokenizer import load_tokenizer

    cfg = validate(preset("shapes", "pixel_rf"))
    stream = data.make_stream(cfg, load_tokenizer(checkpoint.resolve("shapes_vlm") / "tokenizer"),
                              Layout.for_model(cfg.model))
    longest = max(int((stream.batch(step, 32)["kind"] != PAD).sum(1).max()) for step in range(0, 4000, 200))
    assert 100 < longest and 1.5 * longest <= PACK["shapes"]


class _Stopped(Exception):
    pass


@pytest.mark.parametrize("minutes,trained", [(10, 8.3), (30, 28.0)])
def test_the_pixel_stage_gets_the_budget_less_at_most_two_minutes_of_evaluation(tmp_path, monkeypatch, minutes, trained):
    """Evaluation takes about a minute whatever the budget: a 10-minute demo keeps 17% for it, a 30-minute one 2
    minutes, not 5."""
    from repforce.study import demo as demo_module

    seen = {}

    def fake_train(cfg, out, progress, minutes):
        seen["minutes"] = minutes
        raise _Stopped

    monkeypatch.setattr(demo_module, "train", fake_train)
    with pytest.raises(_Stopped):
        demo(tmp_path / "d", minutes=minutes, preset="shapes", progress=False)
    assert trained - 0.05 < seen["minutes"] <= trained
