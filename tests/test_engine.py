import numpy as np
import pytest
import torch
from PIL import Image

from repforce import config as C
from repforce import engine as E
from repforce.presets import preset
from repforce.train import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for v in ("pixel_rf", "pixel", "pixel_cont", "vlm", "pixel_rf_2d"):
        more = ["model.image_rope=2d", "model.pos_init=sincos"] if v.endswith("_2d") else []
        cfg = C.override(preset("tiny", v.removesuffix("_2d")), ["train.steps=4", "train.ckpt_every=100",
                                                                 "train.precision=fp32", *more])
        train(cfg, root / v, progress=False)
        out[v] = root / v
    return out


def _randomize(engine):
    # a trained-for-4-steps model has zero heads; give every weight some signal so the
    # comparisons below are between non-trivial computations
    torch.manual_seed(0)
    with torch.no_grad():
        for p in engine.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return engine


@pytest.fixture(scope="module")
def rf(runs):
    return _randomize(E.load(runs["pixel_rf"], precision="fp32"))


def test_same_seed_same_image(rf):
    a, ra = rf.generate_arrays(["a red circle", "two squares"], n=2, seed=3, options=E.GenOptions(steps=4))
    b, rb = rf.generate_arrays(["a red circle", "two squares"], n=2, seed=3, options=E.GenOptions(steps=4))
    c, _ = rf.generate_arrays(["a red circle", "two squares"], n=2, seed=4, options=E.GenOptions(steps=4))
    assert a.shape == (4, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and np.array_equal(ra, rb)
    assert not np.array_equal(a, c)
    assert ra.shape == (4, rf.cfg.n_rep) and ra.max() < rf.cfg.codebook_size


@pytest.mark.parametrize("variant", ["pixel_rf", "pixel", "pixel_cont", "pixel_rf_2d"])
def test_cached_equals_uncached(runs, variant):
    eng = _randomize(E.load(runs[variant], precision="fp32"))
    opts = dict(steps=3, rep_temperature=0.0)
    gen = lambda cache: eng.generate_arrays(["a blue square", "three circles and more words"], n=2, seed=1,  # noqa: E731
                                            options=E.GenOptions(use_cache=cache, **opts))
    (a, ra), (b, rb) = gen(True), gen(False)
    if ra is not None:
        assert np.allclose(ra, rb, atol=1e-4)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # equal up to rounding to uint8


def test_cached_rep_logits_equal_uncached(rf):
    # logits of the cached step-by-step decode against a full forward over the same ids
    m = rf.model
    ids = torch.randint(0, rf.cfg.codebook_size, (2, rf.cfg.n_rep))
    rows = [E.gen_prefix(rf.tok, p) for p in ("a red circle", "two big blue squares")]
    tokens, kind, pos = E._left_pad(rows, [[E.TEXT] * len(r) for r in rows])
    with torch.no_grad():
        full_h = torch.cat([m.embed_text(tokens), m.embed_rep(ids)], 1)
        full_k = torch.cat([kind, torch.full_like(ids, E.REP)], 1)
        full_p = torch.cat([pos, pos[:, -1:] + 1 + torch.arange(ids.shape[1])], 1)
        ref = m.rep_logits(m.forward_hidden(full_h, full_k, full_p))[:, tokens.shape[1] - 1:-1]
        cache, hid = rf._prefill(m.embed_text(tokens), kind, pos, ids.shape[1])
        got = [m.rep_logits(hid[:, -1])]
        for i in range(ids.shape[1] - 1):
            h = m.forward_hidden(m.embed_rep(ids[:, i:i + 1], start=i), torch.full((2, 1), E.REP),
                                 pos[:, -1:] + 1 + i, kv_cache=cache)
            got.append(m.rep_logits(h[:, -1]))
    assert torch.allclose(torch.stack(got, 1), ref, atol=1e-4)


def test_guidance_one_is_the_conditional_branch(rf):
    opts = E.GenOptions(steps=3, cfg=1.0, rep_cfg=1.0)
    a, ra = rf.generate_arrays(["a green triangle"], n=2, seed=0, options=opts)
    rf.null_prompt = "four red squares"  # change what the unconditional branch sees
    try:
        b, rb = rf.generate_arrays(["a green triangle"], n=2, seed=0, options=opts)
        c, _ = rf.generate_arrays(["a green triangle"], n=2, seed=0, options=E.GenOptions(steps=3, cfg=3.0, rep_cfg=1.0))
    finally:
        rf.null_prompt = ""
    d, _ = rf.generate_arrays(["a green triangle"], n=2, seed=0, options=E.GenOptions(steps=3, cfg=3.0, rep_cfg=1.0))
    assert np.array_equal(ra, rb)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert np.abs(c.astype(int) - d.astype(int)).max() > 1  # at w=3 the other branch matters


def test_heun_and_shift_run(rf):
    imgs = rf.generate(["a circle"], n=1, steps=2, solver="heun", shift=0.5, interval=(0.1, 0.9))
    assert len(imgs) == 1 and imgs[0].size == (32, 32)


def test_default_shift_follows_resolution(rf, monkeypatch):
    seen, euler = [], E.flow.euler
    monkeypatch.setattr(E.flow, "euler", lambda *a, shift, **kw: seen.append(shift) or euler(*a, shift=shift, **kw))
    rf.generate(["a circle"], n=1, steps=1)
    rf.generate(["a circle"], n=1, steps=1, shift=0.5)  # an explicit shift still wins
    assert seen == [E.flow.resolution_shift(rf.model.cfg.image_size), 0.5] and seen[0] == 1.0  # 32 px: uniform

def test_answer_cached_equals_uncached(runs):
    eng = _randomize(E.load(runs["vlm"], precision="fp32"))
    img = np.full((32, 32, 3), 240, np.uint8)
    qs = ["what color is the circle?", "how many squares are there?"]
    a = eng.answer([img, Image.fromarray(img)], qs, max_new_tokens=6)
    b = eng.answer([img, img], qs, max_new_tokens=6, use_cache=False)
    assert a == b and all(isinstance(x, str) for x in a)
    assert len(eng.caption([img])) == 1


def test_bad_input_is_one_line(runs, rf, tmp_path):
    with pytest.raises(E.InferenceError, match="no such checkpoint"):
        E.load(tmp_path / "missing")
    with pytest.raises(E.InferenceError, match="empty prompt"):
        rf.generate([""])
    with pytest.raises(E.InferenceError, match="prompt too long"):
        rf.generate(["red " * 600])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(E.InferenceError, match="unreadable image"):
        rf.answer([bad], ["what is this?"])
    with pytest.raises(E.InferenceError, match="does not generate"):
        E.load(runs["vlm"]).generate(["a red circle"])


def test_cli_generate_answer_and_api(runs, tmp_path, capsys):
    import repforce
    from repforce.cli import main

    run = str(runs["pixel_rf"])
    assert main(["generate", "--ckpt", run, "--prompt", "two red circles above a blue square", "--n", "2",
                 "--steps", "2", "--out", str(tmp_path / "g")]) == 0
    assert sorted(p.name for p in (tmp_path / "g").glob("*.png")) == ["000_00.png", "000_01.png"]
    assert main(["generate", "--ckpt", run, "--prompts", "shapeseval", "--per-category", "1", "--n", "1",
                 "--steps", "2", "--out", str(tmp_path / "se")]) == 0
    assert main(["eval", "shapes", "--images", str(tmp_path / "se"), "--n", "1", "--per-category", "1"]) == 0
    assert "complete" in capsys.readouterr().out
    assert main(["answer", "--ckpt", run, "--image", str(tmp_path / "g" / "000_00.png"),
                 "--question", "what color is the circle?"]) == 0
    capsys.readouterr()
    assert main(["eval", "vqa", "--ckpt", run, "--n", "8", "--captions", "2"]) == 0
    out = capsys.readouterr().out
    assert "on 8 held-out questions" in out and "caption exact match" in out
    assert main(["eval", "vqa", "--ckpt", str(tmp_path / "nope")]) == 2
    assert main(["answer", "--ckpt", str(tmp_path / "nope"), "--image", "x.png", "--caption"]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    assert main(["generate", "--ckpt", run, "--prompt", " ", "--out", str(tmp_path / "e")]) == 2
    assert "empty prompt" in capsys.readouterr().err
    model = repforce.load(run)
    imgs = model.generate(["a red circle"], n=2, steps=2)
    assert len(imgs) == 2 and imgs[0].size == (32, 32)
    assert len(model.answer(imgs, ["what color is the circle?"] * 2)) == 2


def test_exported_model_loads_by_folder_and_name(runs, tmp_path, monkeypatch, capsys):
    from repforce import checkpoint
    from repforce.cli import main

    out = tmp_path / "assets" / "toy"
    assert main(["export", "--ckpt", str(runs["pixel_rf"]), "--out", str(out), "--version", "toy-v1",
                 "--meta", '{"shapeseval": 0.5}']) == 0
    assert "fp16" in capsys.readouterr().out
    meta = __import__("json").loads((out / "model.json").read_text())
    assert meta["name"] == "toy" and meta["version"] == "toy-v1" and meta["shapeseval"] == 0.5
    assert meta["step"] == 4 and len(meta["sha256"]) == 64
    run, shipped = E.load(runs["pixel_rf"], precision="fp32"), E.load(out, precision="fp32")
    for (k, a), b in zip(run.model.state_dict().items(), shipped.model.state_dict().values()):
        assert torch.equal(a.half().float(), b), k  # the fp16 weights, nothing else changed
    opts = E.GenOptions(steps=2)
    assert shipped.generate_arrays(["a red circle"], 1, 0, opts)[0].shape == (1, 32, 32, 3)
    # a shipped name resolves to assets/<name>, for load and for --init
    monkeypatch.setattr(checkpoint, "ASSETS", tmp_path / "assets")
    assert checkpoint.shipped() == ["toy"] and checkpoint.resolve("toy") == out
    assert E.load("toy").cfg == shipped.cfg
    with pytest.raises(E.InferenceError, match="shipped models: toy"):
        E.load("nonesuch")
    # a damaged file is refused by its checksum, in one line
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(E.InferenceError, match="sha256 .* does not match model.json"):
        E.load("toy")


def test_oracle_feeds_the_truth_renders_rep_tokens_to_the_pixel_stage(rf, runs, monkeypatch):
    from repforce.study import evaluate
    from repforce.worlds import shapes, shapeseval

    seen = []
    real = rf.sample_pixels
    monkeypatch.setattr(rf, "sample_pixels", lambda prompts, reps, o, gen: seen.append((prompts, reps)) or real(
        prompts, reps, o, gen))
    scores, arr = evaluate.oracle_shapeseval(rf, n=2, options=E.GenOptions(steps=2), per_category=1, batch_size=5)
    plist = shapeseval.prompts(1)
    assert arr.shape == (2 * len(plist), 32, 32, 3) and set(scores) == {*shapeseval.CATEGORIES, "overall"}
    prompts = [p for chunk, _ in seen for p in chunk]
    reps = torch.cat([r for _, r in seen])
    assert prompts == [p.text for p in plist for _ in range(2)]
    truth = [shapes.render(shapeseval.scene_for_prompt(p, shapeseval.truth_seed(p, k), 32)) for p in plist for k in range(2)]
    x = torch.from_numpy(np.stack(truth)).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    # the truth renders' own tokens, not sampled ones (the tiny quantizer balances within a batch: chunk as the oracle)
    assert torch.equal(reps, torch.cat([rf.model.rep_targets(x[s:s + 5])[0] for s in range(0, len(x), 5)]))
    with pytest.raises(ValueError, match="needs rep ids"):
        evaluate.oracle_shapeseval(E.load(runs["pixel"]), n=1, per_category=1)


def test_rep_reliance_is_zero_for_a_renderer_that_cannot_see_the_rep_ids(runs):
    from repforce.study import evaluate

    eng = _randomize(E.load(runs["pixel_rf"], precision="fp32"))
    r = evaluate.rep_reliance(eng, n=6)
    assert set(r["gap"]) == {"0.1", "0.3"} and all(v > 0 for v in r["mse_own"].values())
    assert any(abs(v) > 1e-6 for v in r["gap"].values())  # random weights: the ids change the prediction
    with torch.no_grad():
        eng.model.rep_embed.weight.zero_()  # every id embeds alike: nothing to read
    assert all(v == 0 for v in evaluate.rep_reliance(eng, n=6)["gap"].values())
    with pytest.raises(ValueError, match="needs rep ids"):
        evaluate.rep_reliance(E.load(runs["pixel"]), n=2)
