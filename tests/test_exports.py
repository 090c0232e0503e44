"""GenEval and DPG-Bench folder layouts (repforce.exports), written through `repforce generate`
by the shipped shapes model on a few metadata lines that the tests write, and bad metadata as
one-line errors (exit 2) before any model loads."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from repforce import exports
from repforce.cli import main

GENEVAL_LINES = [
    {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"},
    {"tag": "counting", "include": [{"class": "square", "count": 2}], "exclude": [{"class": "square", "count": 3}],
     "prompt": "a photo of two squares"},
    {"tag": "colors", "include": [{"class": "triangle", "count": 1, "color": "red"}], "prompt": "a photo of a red triangle"},
]
DPG_PROMPTS = {"1": "two red circles", "256": "a large blue square", "COCOval2014000000000285": "a small green triangle"}
FAST = ["--steps", "2", "--ckpt", "shapes"]


def _geneval_file(tmp_path, lines=GENEVAL_LINES, extra=""):
    f = tmp_path / "evaluation_metadata.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in lines) + extra)
    return f


def test_geneval_layout(tmp_path, capsys):
    meta, out = _geneval_file(tmp_path, extra="\n"), tmp_path / "geneval"
    assert main(["generate", "--prompts", "geneval", "--metadata", str(meta), "--out", str(out), "--n", "2", *FAST]) == 0
    assert "evaluate_images.py" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["00000", "00001", "00002"]  # one folder per line; the blank one is no prompt
    for i, line in enumerate(GENEVAL_LINES):
        folder = out / f"{i:05d}"
        assert sorted(os.listdir(folder)) == ["grid.png", "metadata.jsonl", "samples"]
        with open(folder / "metadata.jsonl") as fp:
            assert json.load(fp) == line  # the scorer reads the file with json.load: the line, unchanged
        assert sorted(os.listdir(folder / "samples")) == ["0000.png", "0001.png"]
        for k in range(2):
            im = Image.open(folder / "samples" / f"{k:04d}.png")
            assert (im.mode, im.size) == ("RGB", (32, 32))
        assert Image.open(folder / "grid.png").size == (64, 32)


def test_dpg_layout(tmp_path, capsys):
    prompts, out = tmp_path / "prompts", tmp_path / "dpg"
    prompts.mkdir()
    for key, text in DPG_PROMPTS.items():
        (prompts / f"{key}.txt").write_text(text + "\n")
    (prompts / "README.md").write_text("not a prompt")
    assert main(["generate", "--prompts", "dpg", "--metadata", str(prompts), "--out", str(out), *FAST]) == 0
    assert "PIC_NUM=4 bash dpg_bench/dist_eval.sh" in capsys.readouterr().out
    # the scorer reads every entry of the folder as an image named by its prompt id: nothing else may be there
    assert sorted(os.listdir(out)) == sorted(f"{k}.png" for k in DPG_PROMPTS)
    for key in DPG_PROMPTS:
        im = Image.open(out / f"{key}.png")
        assert (im.mode, im.size) == ("RGB", (64, 64))  # four 32 px samples, 2x2


def test_tiles_follow_the_dpg_crop_order():
    imgs = np.stack([np.full((2, 2, 3), v, np.uint8) for v in (10, 20, 30)])
    g = exports.tile(imgs, 2)
    # DPG crops (0,0), (r,0), (0,r), (r,r) as (left, top): top-left, top-right, bottom-left, bottom-right
    assert g.shape == (4, 4, 3)
    assert [g[0, 0, 0], g[0, 2, 0], g[2, 0, 0], g[2, 2, 0]] == [10, 20, 30, 255]  # a missing tile is white


def test_dpg_reads_its_csv(tmp_path):
    f = tmp_path / "dpg_bench.csv"
    f.write_text("item_id,text,proposition_id\n"
                 "b2,a blue square,1\nb2,a blue square,2\na1,\"two red circles, small\",1\n")
    assert [(p.key, p.text) for p in exports.read_dpg(f)] == [("a1", "two red circles, small"), ("b2", "a blue square")]


@pytest.mark.parametrize("setup, args, message", [
    (None, ["--prompts", "geneval", "--metadata", "{t}/missing.jsonl"], "no such metadata file: {t}/missing.jsonl"),
    ("bad_json", ["--prompts", "geneval", "--metadata", "{t}/evaluation_metadata.jsonl"],
     "{t}/evaluation_metadata.jsonl:2: not a JSON object"),
    ("no_prompt", ["--prompts", "geneval", "--metadata", "{t}/evaluation_metadata.jsonl"],
     "{t}/evaluation_metadata.jsonl:2: no 'prompt' string"),
    (None, ["--prompts", "geneval"], "--metadata FILE goes with --prompts geneval or dpg"),
    (None, ["--prompts", "shapeseval", "--metadata", "{t}"], "--metadata FILE goes with --prompts geneval or dpg"),
    (None, ["--prompts", "dpg", "--metadata", "{t}"], "{t}: no <id>.txt prompt files"),
    ("empty_txt", ["--prompts", "dpg", "--metadata", "{t}"], "{t}/7.txt: empty prompt"),
    (None, ["--prompts", "dpg", "--metadata", "{t}", "--n", "5"], "--n=5: DPG-Bench takes 1 to 4 images per prompt"),
    (None, ["--prompts", "parti"], "the prompt sets are shapeseval, geneval and dpg"),
])
def test_bad_metadata_is_one_line_exit_2(tmp_path, capsys, setup, args, message):
    if setup == "bad_json":
        _geneval_file(tmp_path, GENEVAL_LINES[:1], extra='{"tag": "colors", "prompt": "a red circle"\n')
    elif setup == "no_prompt":
        _geneval_file(tmp_path, GENEVAL_LINES[:1], extra='{"tag": "colors"}\n')
    elif setup == "empty_txt":
        (tmp_path / "7.txt").write_text("  \n")
    t = str(tmp_path)
    # the checkpoint does not exist: these must fail on the metadata, before a model is looked for
    argv = ["generate", "--ckpt", f"{t}/no_model", "--out", f"{t}/out", *[a.format(t=t) for a in args]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("repforce: error: ") and message.format(t=t) in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_a_prompt_too_long_is_named_before_any_image(tmp_path, capsys):
    meta = _geneval_file(tmp_path, GENEVAL_LINES[:1] + [{"tag": "colors", "prompt": "red " * 600}])
    assert main(["generate", "--prompts", "geneval", "--metadata", str(meta), "--out", str(tmp_path / "out"), *FAST]) == 2
    assert f"{meta}:2: prompt too long" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
