import json

import numpy as np
import pytest
from PIL import Image

from repforce.worlds import shapes as world
from repforce.worlds import shapeseval as se


@pytest.fixture(scope="module")
def truth():
    return {(p.index, k): world.render(se.scene_for_prompt(p, se.truth_seed(p, k)))
            for p in se.prompts() for k in range(2)}


def test_prompt_set_is_fixed_and_complete():
    ps = se.prompts()
    assert [p.to_json() for p in ps] == [p.to_json() for p in se.prompts()]
    for cat in se.CATEGORIES:
        assert sum(p.category == cat for p in ps) >= 50
    assert [p.index for p in ps] == list(range(len(ps)))


def test_truth_seeds_are_heldout():
    assert all(world.split_of_seed(se.truth_seed(p, k)) == "heldout" for p in se.prompts() for k in range(4))


def test_ground_truth_scores_one(truth):
    report = se.score_images(truth)
    for cat in se.CATEGORIES:
        assert report.scores[cat] >= 0.99, (cat, [r for r in report.images if not r["correct"]][:3])


def test_ground_truth_64px():
    imgs = {(p.index, 0): world.render(se.scene_for_prompt(p, se.truth_seed(p, 0), 64)) for p in se.prompts()[::3]}
    assert se.score_images(imgs).scores["overall"] >= 0.99


def test_parse_recovers_random_scenes():
    for s in world.scenes("heldout", 0, 300):
        got = sorted((d.shape, d.color) for d in se.parse(world.render(s)))
        assert got == sorted((o.shape, o.color) for o in s.objects)


def test_noise_and_blank_score_near_zero(truth):
    rng = np.random.default_rng(0)
    noise = {key: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for key in truth}
    assert se.score_images(noise).scores["overall"] <= 0.02
    blank = {key: np.full((32, 32, 3), world.BACKGROUND, np.uint8) for key in truth}
    assert se.score_images(blank).scores["overall"] == 0.0


def test_wrong_colors_fail_color_categories():
    plist = se.prompts()
    imgs = {}
    for p in plist:
        if p.category in ("colors", "color_attr"):
            s = se.scene_for_prompt(p, se.truth_seed(p, 0))
            shift = {c: world.COLORS[(i + 1) % len(world.COLORS)] for i, c in enumerate(world.COLORS)}
            wrong = world.Scene(tuple(world.Obj(o.shape, shift[o.color], o.size, o.cx, o.cy) for o in s.objects), 32)
            imgs[(p.index, 0)] = world.render(wrong)
    r = se.score_images(imgs)
    assert r.scores["colors"] == 0.0 and r.scores["color_attr"] <= 0.02


def test_removed_object_fails_count_and_two_object():
    imgs = {}
    for p in se.prompts():
        if p.category in ("counting", "two_object", "color_attr", "position"):
            s = se.scene_for_prompt(p, se.truth_seed(p, 0))
            imgs[(p.index, 0)] = world.render(world.Scene(s.objects[1:], 32))
    r = se.score_images(imgs)
    assert all(r.scores[c] == 0.0 for c in ("counting", "two_object", "color_attr", "position"))


def test_extra_object_fails_counting():
    p = next(p for p in se.prompts() if p.category == "counting" and p.include[0]["count"] == 2)
    s = se.scene_for_prompt(p, 11)
    shape = p.include[0]["shape"]
    three = world.make_scene(np.random.default_rng(1), [{"shape": shape}] * 3, 32)
    assert se.judge(p, se.parse(world.render(s)), 32)[0]
    assert not se.judge(p, se.parse(world.render(three)), 32)[0]


def test_swapped_position_fails():
    for p in [p for p in se.prompts() if p.category == "position"][:12]:
        s = se.scene_for_prompt(p, 5)
        a, b = s.objects
        swapped = world.Scene((world.Obj(a.shape, a.color, a.size, b.cx, b.cy),
                               world.Obj(b.shape, b.color, b.size, a.cx, a.cy)), 32)
        assert not se.judge(p, se.parse(world.render(swapped)), 32)[0]


def _write(folder, per_prompt):
    se.write_truth(folder, n=per_prompt)


def test_folder_evaluation_and_bad_input(tmp_path):
    se.write_truth(tmp_path, n=2)
    r = se.evaluate(tmp_path, n=2)
    assert r.complete and r.scores["overall"] >= 0.99
    assert len(r.images) == 2 * len(se.prompts())
    # break it in every way the issue names
    (tmp_path / "00000" / "samples" / "0000.png").unlink()  # missing
    (tmp_path / "00001" / "samples" / "0001.png").write_bytes(b"not a png")  # unreadable
    Image.new("RGB", (48, 48)).save(tmp_path / "00002" / "samples" / "0000.png")  # wrong size
    Image.new("L", (32, 32)).save(tmp_path / "00003" / "samples" / "0000.png")  # grayscale
    Image.new("RGB", (32, 32)).save(tmp_path / "00004" / "samples" / "0009.png")  # extra
    (tmp_path / "stray").mkdir()
    meta = tmp_path / "00005" / "metadata.json"
    meta.write_text(json.dumps({"prompt": "something else", "version": se.PROMPTS_VERSION}))
    r = se.evaluate(tmp_path, n=2)
    assert not r.complete
    assert len(r.problems["missing"]) == 1 and len(r.problems["unreadable"]) == 1
    assert len(r.problems["wrong_size"]) == 1 and len(r.problems["grayscale"]) == 1
    assert len(r.problems["extra"]) == 2 and r.problems["mismatch"] == [str(meta)]
    failed = [row for row in r.images if not row["correct"]]
    assert len(failed) == 6  # 4 broken images + 2 images of the mismatched prompt
    assert len(r.images) == 2 * len(se.prompts())


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(se.EvalError, match="none of the"):
        se.evaluate(tmp_path)
    with pytest.raises(se.EvalError, match="no such folder"):
        se.evaluate(tmp_path / "nope")
