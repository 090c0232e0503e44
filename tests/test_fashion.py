import gzip
import struct

import numpy as np
import pytest

from repforce.config import DataConfig
from repforce.data import sample_at
from repforce.worlds import fashion as fm

HAVE = fm.available()
needs_data = pytest.mark.skipif(not HAVE, reason="Fashion-MNIST IDX files absent: apt-get install dataset-fashion-mnist")


def _idx(path, arr, magic=0x0803, gz=False, cut=0):
    head = struct.pack(">HBB", 0, 0x08, arr.ndim) if magic == 0x0803 or magic == 0x0801 else struct.pack(">I", magic)
    data = head + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.astype(np.uint8).tobytes()
    data = data[: len(data) - cut] if cut else data
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def test_idx_reader_round_trip_and_errors(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    assert np.array_equal(fm.read_idx(_idx(tmp_path / "a", imgs)), imgs)
    assert np.array_equal(fm.read_idx(_idx(tmp_path / "b.gz", imgs, gz=True)), imgs)
    with pytest.raises(fm.FashionDataError, match="truncated"):
        fm.read_idx(_idx(tmp_path / "c", imgs, cut=100))
    with pytest.raises(fm.FashionDataError, match="wrong magic"):
        fm.read_idx(_idx(tmp_path / "d", imgs, magic=0x12345678))
    (tmp_path / "e").write_bytes(b"\x00\x00")
    with pytest.raises(fm.FashionDataError, match="truncated"):
        fm.read_idx(tmp_path / "e")
    (tmp_path / "f.gz").write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(fm.FashionDataError, match="unreadable"):
        fm.read_idx(tmp_path / "f.gz")


def test_missing_files_name_the_package(tmp_path):
    with pytest.raises(fm.FashionDataError, match="apt-get install dataset-fashion-mnist"):
        fm.load_split("train", tmp_path)


def test_text_from_class_names():
    assert fm.caption(7) == "a photo of a sneaker"
    assert fm.caption(9) == "a photo of an ankle boot"
    assert fm.prompts()[0] == "a photo of a t-shirt" and len(fm.prompts()) == 10


def test_canvas():
    img = np.full((28, 28), 200, np.uint8)
    c = fm.to_canvas(img, 32)
    assert c.shape == (32, 32, 3) and c[0, 0, 0] == 0 and c[16, 16, 1] == 200
    assert fm.to_canvas(img, 32, rgb=False).shape == (32, 32, 1)


def test_composites_put_each_item_in_its_half():
    a, b = np.full((28, 28), 200, np.uint8), np.full((28, 28), 60, np.uint8)
    c = fm.pair_canvas(a, b, 32)
    assert c.shape == (32, 32, 3)
    assert c[16, 4, 0] == 200 and c[16, 28, 0] == 60  # left item, right item
    assert c[2, 4, 0] == 0 and c[30, 28, 0] == 0  # half-size items, centered vertically: black above and below
    left, right = fm.pair_halves(c[None])
    assert left.shape == right.shape == (1, 32, 32)
    assert left[0, 16, 16] == 200 and right[0, 16, 16] == 60  # each half back at judge size
    assert np.array_equal(left[0, 2:30, 2:30], fm.half_item(a, 16))  # the pair judge trains on what it will read
    assert fm.pair_caption(8, 5) == "a bag to the left of a sandal"
    assert fm.pair_caption(9, 0) == "an ankle boot to the left of a t-shirt"
    pairs = fm.pair_prompts(20)
    assert len(set(pairs)) == 20 and all(i != j for i, j in pairs) and pairs == fm.pair_prompts(20)


@needs_data
def test_composite_stream_and_judge():
    cfg = DataConfig(world="fashion", fashion_pairs=1.0)
    samples = [sample_at(cfg, j) for j in range(40)]
    gen = [s for s in samples if s.is_gen and s.prompt]
    und = [s for s in samples if not s.is_gen and s.prompt in fm.PAIR_QUESTIONS]
    assert gen and all(" to the left of " in s.prompt for s in gen)
    assert und and all(s.answer in fm.CLASSES for s in und)
    # off by default: no composite in the stream
    plain = [sample_at(DataConfig(world="fashion"), j) for j in range(40)]
    assert not any(" to the left of " in s.prompt + s.answer or s.prompt in fm.PAIR_QUESTIONS for s in plain)
    judge, meta = fm.load_judge(fm.PAIR_JUDGE_DIR)
    assert meta["version"] == fm.PAIR_JUDGE_VERSION and meta["item"] == 16
    real = fm.pair_ceiling(judge, n=300)
    assert real["pair_accuracy"] >= 0.6 and real["swapped"] < 0.02
    # the same composites scored against the swapped order: the judge sees the order, not just the items
    x, y = fm.load_split("test")
    imgs = np.stack([fm.pair_canvas(x[i], x[i + 1]) for i in range(0, 200, 2) if y[i] != y[i + 1]])
    truth = np.array([(y[i], y[i + 1]) for i in range(0, 200, 2) if y[i] != y[i + 1]])
    right, wrong = fm.score_pairs(imgs, truth, judge), fm.score_pairs(imgs, truth[:, ::-1], judge)
    assert right["pair_accuracy"] > 0.5 > wrong["pair_accuracy"] + 0.3 and wrong["swapped"] == right["pair_accuracy"]


@needs_data
def test_real_data_and_stream():
    x, y = fm.load_split("test")
    assert x.shape == (10000, 28, 28) and y.shape == (10000,) and set(np.unique(y)) == set(range(10))
    cfg = DataConfig(world="fashion")
    kinds = [sample_at(cfg, j) for j in range(40)]
    assert any(s.is_gen for s in kinds) and any(not s.is_gen for s in kinds)
    und = [s for s in kinds if not s.is_gen and s.prompt == fm.QUESTION]
    assert und and all(s.answer in fm.CLASSES for s in und)
    assert all(s.image.shape == (32, 32, 3) for s in kinds)


@needs_data
def test_shipped_judge_accuracy_floor():
    judge, meta = fm.load_judge()
    assert meta["version"] == fm.JUDGE_VERSION and meta["test_accuracy"] >= 0.90
    x, y = fm.load_split("test")
    imgs = np.stack([fm.to_canvas(im, 32, rgb=False)[..., 0] for im in x[:3000]])
    pred, feats = fm.predict(judge, imgs)
    assert (pred == y[:3000]).mean() >= 0.90
    # the Frechet distance separates real from wrong: real vs real is small, real vs blurred noise large
    fd_same = fm.frechet_distance(feats[:1500], feats[1500:])
    noise = np.random.default_rng(0).integers(0, 256, (1500, 32, 32)).astype(np.uint8)
    _, nf = fm.predict(judge, noise)
    assert fd_same * 5 < fm.frechet_distance(nf, feats[1500:])


@needs_data
def test_judge_training_learns(tmp_path):
    meta = fm.train_judge(tmp_path, epochs=2, limit=4000, progress=False)
    assert meta["test_accuracy"] > 0.5  # 5x chance after 2 short epochs; the shipped judge reaches >= 0.90 and (tmp_path / "judge.safetensors").exists()
    judge, m2 = fm.load_judge(tmp_path)
    assert m2["sha256"] == meta["sha256"]
    (tmp_path / "judge.safetensors").write_bytes(b"tampered")
    with pytest.raises(fm.FashionDataError, match="sha256"):
        fm.load_judge(tmp_path)


def test_gray_needs_the_fashion_world_and_a_pixel_model():
    from repforce import config as C
    from repforce.presets import preset

    cfg = C.validate(C.override(preset("tiny", "pixel_rf"), ["data.world=fashion", "data.channels=1"]))
    assert cfg.model.image_channels == cfg.model.gen_channels == 1  # data.channels carries the model with it
    with pytest.raises(C.ConfigError, match="data.channels=1: gray images need data.world=fashion"):
        C.validate(C.override(preset("tiny", "pixel"), ["data.channels=1"]))
    with pytest.raises(C.ConfigError, match="model.image_channels=1: must equal data.channels=3"):
        C.validate(C.override(preset("tiny", "pixel"), ["model.image_channels=1", "model.gen_channels=1"]))
    with pytest.raises(C.ConfigError, match="RGB VAE"):
        C.validate(C.override(preset("tiny", "vae"), ["data.world=fashion", "data.channels=1", "train.vae=v"]))


@needs_data
def test_gray_model_trains_generates_and_answers(tmp_path):
    from PIL import Image

    import repforce
    from repforce import config as C
    from repforce.engine import GenOptions
    from repforce.presets import preset
    from repforce.train import train

    cfg = C.override(preset("tiny", "pixel_rf"), ["data.world=fashion", "data.channels=1", "data.fashion_pairs=0.5",
                                                   "train.steps=3", "train.batch_size=4"])
    samples = [sample_at(cfg.data, j) for j in range(20)]
    assert all(s.image.shape == (32, 32, 1) for s in samples)  # one-item and composite canvases alike
    train(cfg, tmp_path, progress=False)
    model = repforce.load(tmp_path)
    assert model.model.encoder.patch_embed.in_features == 4 * 4 * 1
    arr, _ = model.generate_arrays(["a photo of a bag"], n=2, options=GenOptions(steps=2))
    assert arr.shape == (2, 32, 32, 3) and (arr[..., 0] == arr[..., 2]).all()  # gray, replicated for PNG and judges
    x, _ = fm.load_split("test")
    gray = fm.to_canvas(x[0], 32, rgb=False)
    Image.fromarray(fm.to_canvas(x[0], 32)).save(tmp_path / "rgb.png")
    a = model.answer([gray, gray[..., 0], tmp_path / "rgb.png"], [fm.QUESTION] * 3)
    assert len(a) == 3 and a[0] == a[1] == a[2]  # the same gray image, however it comes
