"""Real data sources built here in tmp dirs (webdataset shards, a datasets folder, a JSONL folder), broken files
included.  Run: pytest tests/test_datasources.py"""

import io
import json
import tarfile
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from repforce import config as C
from repforce.config import MixConfig, Source
from repforce.data import build_world_tokenizer
from repforce.datasources import DataError, MixStream, Plan, load_image, permute
from repforce.presets import preset
from repforce.sequence import Layout


def png(size=(40, 24), mode="RGB", color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else None).save(buf, "PNG")
    return buf.getvalue()


def jpeg(size=(50, 30), mode="RGB") -> bytes:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.convert(mode).save(buf, "JPEG")
    return buf.getvalue()


GOOD = [png((40, 24)), jpeg((50, 30)), png((31, 77), "L", 128), png((20, 20), "RGBA", (0, 0, 255, 0)),
        jpeg((33, 21), "CMYK"), png((64, 64))]
BROKEN = {"truncated": jpeg((64, 64))[:len(jpeg((64, 64))) // 2], "not_image": b"this is not an image",
          "giant": png((300, 300))}


def write_tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    wds = root / "wds"
    wds.mkdir()
    for s in range(2):  # good shards: captions as .txt or in .json
        members = {}
        for k, img in enumerate(GOOD):
            key = f"s{s}_{k:03d}"
            members[f"{key}.png"] = img
            if k % 2:
                members[f"{key}.json"] = json.dumps({"caption": f"picture {k} of shard {s}"}).encode()
            else:
                members[f"{key}.txt"] = f"a picture number {k}".encode()
        write_tar(wds / f"{s:05d}.tar", members)
    broken = {f"b_{r}.jpg": v for r, v in BROKEN.items()}
    broken.update({f"b_{r}.txt": b"caption" for r in BROKEN})
    broken["b_empty.png"], broken["b_empty.txt"] = GOOD[0], b"   "
    write_tar(wds / "00002.tar", broken)
    (wds / "00003.tar").write_bytes(b"\x00garbage, not a tar" * 10)  # a shard that fails to open

    llava = root / "llava"
    (llava / "img").mkdir(parents=True)
    lines = []
    for k, img in enumerate(GOOD):
        (llava / "img" / f"{k}.png").write_bytes(img)
        lines.append({"image": f"img/{k}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "a square"}]})
    lines.append({"image": "img/missing.png", "conversations": lines[0]["conversations"]})
    (llava / "index.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")

    import datasets

    hf = root / "hf"
    ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in GOOD],
                                     "caption": [f"hf caption {k}" for k in range(len(GOOD))]})
    ds.cast_column("image", datasets.Image()).save_to_disk(str(hf))
    tok = build_world_tokenizer(root / "tok", n_scenes=50)
    return root, tok


def mix_cfg(root, sources, variant="pixel_rf", **mix):
    cfg = preset("tiny", variant)
    cfg = replace(cfg, data=replace(cfg.data, world="mix"),
                  mix=MixConfig(sources=tuple(sources), workers=0, max_pixels=40_000, min_checked=20, **mix))
    return C.validate(cfg)


def all_sources(root):
    return [Source("wds", str(root / "wds"), 2.0, "both"), Source("jsonl", str(root / "llava"), 1.0, "und"),
            Source("hf", str(root / "hf"), 1.0, "gen")]


def test_mixture_batches_skip_bad_data_with_counts(data):
    root, tok = data
    cfg = mix_cfg(root, all_sources(root), max_skip_frac=0.9)
    stream = MixStream(cfg, tok, Layout.for_model(cfg.model))
    for step in range(8):
        b = stream.batch(step, 8)
        assert b["images"].shape == (8, 3, 32, 32) and b["images"].min() >= -1 and b["images"].max() <= 1
        und = ~b["is_gen"]
        assert ((b["text_targets"] != -100).sum(1)[und] > 0).all()  # every understanding sample has targets
        assert (b["kind"] == 4).sum() == b["is_gen"].sum() * cfg.model.n_gen
    stats = stream.log_stats()
    assert stats["skip_bad_shard"] == 1 and stats["data_read"] >= 64
    seen = {k for k in stats if k.startswith("skip_")}
    assert seen <= {"skip_bad_shard", "skip_truncated", "skip_not_image", "skip_giant", "skip_empty_text",
                    "skip_missing_file", "skip_bad_json"}
    assert len(seen) >= 4, stats  # the broken shard's members, the missing file, the bad line...
    assert any(k.startswith("converted_") for k in stats), stats  # grayscale, RGBA, CMYK were converted, counted


def test_each_broken_kind_is_named():
    from collections import Counter

    from repforce.datasources import Skip

    conv = Counter()
    for reason, raw in BROKEN.items():
        with pytest.raises(Skip) as e:
            load_image(raw, 32, 40_000, conv)
        assert e.value.reason == reason
    img = load_image(png((31, 77), "L", 128), 32, 40_000, conv)
    assert img.shape == (32, 32, 3) and conv["converted_l"] == 1
    white = load_image(png((20, 20), "RGBA", (0, 0, 255, 0)), 32, 40_000, conv)  # transparent -> white page
    assert (white == 255).all()
    wide = np.zeros((10, 40, 3), dtype=np.uint8)
    wide[:, 15:25] = 255  # a white band in the middle of a wide image survives the center crop
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, "PNG")
    assert load_image(buf.getvalue(), 8, 40_000, conv)[:, 2:6].mean() > 200


def test_batches_are_pure_functions_of_step_and_rank(data):
    root, tok = data
    cfg = mix_cfg(root, all_sources(root), max_skip_frac=0.9)
    a = MixStream(cfg, tok, Layout.for_model(cfg.model))
    for step in range(3):
        a.batch(step, 8)
    late = a.batch(3, 8)
    fresh = MixStream(cfg, tok, Layout.for_model(cfg.model)).batch(3, 8)  # a resumed run
    assert torch.equal(late["images"], fresh["images"]) and torch.equal(late["tokens"], fresh["tokens"])
    half = MixStream(cfg, tok, Layout.for_model(cfg.model)).batch(3, 8, rank=1, world=2)
    assert torch.equal(half["images"], late["images"][4:]) and torch.equal(half["is_gen"], late["is_gen"][4:])
    workers = MixStream(replace(cfg, mix=replace(cfg.mix, workers=2)), tok, Layout.for_model(cfg.model))
    for step in (2, 3):  # prefetching worker processes give the same batches
        got = workers.batch(step, 8)
    assert torch.equal(got["images"], late["images"]) and torch.equal(got["tokens"], late["tokens"])
    assert workers.log_stats()["data_read"] >= 16


def test_too_many_bad_samples_stop_the_run(data):
    root, tok = data
    cfg = mix_cfg(root, [Source("wds", str(root / "wds"), 1.0, "gen")], max_skip_frac=0.05)  # 4 of 16 items bad
    stream = MixStream(cfg, tok, Layout.for_model(cfg.model))
    with pytest.raises(DataError, match="max_skip_frac"):
        for step in range(20):
            stream.batch(step, 8)
    only_bad = mix_cfg(root, [Source("wds", str(root / "wds" / "00002.tar"), 1.0, "gen")], max_skip_frac=0.99)
    with pytest.raises(DataError, match="were all bad"):
        MixStream(only_bad, tok, Layout.for_model(only_bad.model)).batch(0, 4)


def test_config_names_bad_sources(data):
    root, _ = data
    with pytest.raises(C.ConfigError, match="mix.sources"):
        mix_cfg(root, [])
    with pytest.raises(C.ConfigError, match=r"mix.sources\[0\].kind"):
        mix_cfg(root, [Source("parquet", str(root))])
    with pytest.raises(C.ConfigError, match="does not exist"):
        mix_cfg(root, [Source("wds", str(root / "nope"))])
    cfg = C.override(mix_cfg(root, all_sources(root)), [f'mix.sources=[{{"kind": "hf", "path": "{root / "hf"}"}}]'])
    assert cfg.mix.sources == (Source("hf", str(root / "hf")),)
    assert C.Config.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg


def test_mixture_weights_and_permutations():
    for n in (1, 7, 64, 1000):
        assert sorted(permute(i, n, ("k", 3)) for i in range(n)) == list(range(n))
    plan = Plan([3.0, 1.0], [50, 7], seed=0)
    draws = [plan.locate(j) for j in range(4000)]
    share = sum(s == 0 for s, _ in draws) / len(draws)
    assert abs(share - 0.75) < 0.01
    first_epoch = [i for s, i in draws if s == 1][:7]
    assert sorted(first_epoch) == list(range(7))  # each epoch of a source visits every item once


def test_trainer_runs_on_the_mixture(data, tmp_path):
    from repforce.train import train

    root, _ = data
    cfg = mix_cfg(root, all_sources(root), max_skip_frac=0.9)
    cfg = C.override(cfg, ["train.steps=3", "train.log_every=1", "train.batch_size=4"])
    train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if '"step"' in x]
    assert len(rows) == 3 and rows[-1]["skip_bad_shard"] == 1 and np.isfinite(rows[-1]["loss"])
