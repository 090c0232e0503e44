import json
import runpy
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from repforce.study import ablation as study
from repforce.study.report import loss_figure, read_log
from repforce.study.results import (
    group,
    judging_noise,
    load_results,
    margin,
    progress,
    verdict,
    write_results_md,
)
from repforce.worlds import fashion


def test_tiny_study_is_resumable_and_reported(tmp_path, monkeypatch, capsys):
    b = study.Budget(vlm_steps=3, vae_steps=2, steps=3, batch_size=4, seeds=(0, 1), codebooks=(16,), per_category=1,
                     n=1, vqa_n=4, preset="tiny", overrides=("train.precision=fp32",))
    monkeypatch.setitem(study.BUDGETS, "test", b)
    runs, results = tmp_path / "runs", tmp_path / "docs" / "results"
    done = study.ablation("test", runs, results, progress=False)
    names = {r["name"] for r in done}
    assert names == {f"{v}_s{s}" for v in study.MAIN for s in (0, 1)} | {"pixel_repa_s0", "pixel_cont_s0",
                                                                          "pixel_rf_K16_s0"}
    one = json.loads((results / "test" / "pixel_rf_s1.json").read_text())
    assert one["steps"] == 3 and one["config"]["train"]["seed"] == 1 and "overall" in one["shapeseval"]
    assert one["curves"]["step"] and (results / "test" / "grids" / "pixel_rf_s1.png").exists()
    # a rerun trains nothing: every run is already recorded
    stamp = (results / "test" / "pixel_s0.json").stat().st_mtime_ns
    study.ablation("test", runs, results, progress=False)
    assert (results / "test" / "pixel_s0.json").stat().st_mtime_ns == stamp
    # the guidance sweep evaluates as the study does: at the study's weight it reproduces the recorded score
    monkeypatch.setattr(sys, "argv", ["guidance_sweep.py", "--runs", str(runs / "test" / "pixel_rf_s1"), "--cfg", "3",
                                      "1", "--per-category", "1", "--n", "1"])
    sweep = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "guidance_sweep.py"), run_name="__main__")
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["cfg"] for r in rows] == [3.0, 1.0] and rows[0]["images"] == 6
    assert {k: rows[0][k] for k in one["shapeseval"]} == pytest.approx(one["shapeseval"], abs=1e-4)
    saved = {(int(f.parts[-3]), int(f.stem)): np.asarray(Image.open(f).convert("RGB"))
             for f in (runs / "test" / "pixel_rf_s1" / "shapeseval").glob("*/samples/*.png")}
    assert len(saved) == 6 and rows[0]["digest"] == sweep["digest"](saved)
    (results / "findings.md").write_text("## What we found\n\nhand-written")
    (results / "bench").mkdir()
    (results / "bench" / "sampling.jsonl").write_text('# python benchmarks/sampling.py\n{"ratio": 2.0}\n')
    md = write_results_md(results, tmp_path / "docs" / "RESULTS.md").read_text()
    assert "| `pixel_rf` | 0.76 |" in md and "![pixel_rf](results/test/grids/" in md
    sweep = md[md.index("Codebook size"):md.index("ShapesEval by category")]
    assert sweep.index("| 16 |") < sweep.index("(default)")  # rows by K: the sweep's K=16 before the default 32
    assert "In progress" not in md
    assert "hand-written" in md and '{"ratio": 2.0}' in md and "`python benchmarks/sampling.py`" in md
    assert (tmp_path / "docs" / "results" / "test" / "grids").is_dir()


def test_tie_rule():
    assert verdict([0.5, 0.6, 0.55], [0.56, 0.58, 0.57]) == "tie"
    assert verdict([0.2, 0.21, 0.22], [0.7, 0.71, 0.72]) == "higher"
    assert verdict([0.7, 0.71, 0.72], [0.2, 0.21, 0.22]) == "lower"
    # one seed a side: no spread, so only the judging noise of n judged images separates a tie from a win
    assert verdict([0.131], [0.125]) == "lower"
    assert verdict([0.131], [0.125], n=480) == "tie"  # one standard error is 0.022
    assert verdict([0.054], [0.125], n=480) == "higher"  # 0.071 against 0.018
    assert judging_noise(0.5, 0.5, 100) == pytest.approx(0.0707, abs=1e-4)
    # more seeds average more judgements: the same gap leaves the noise floor
    assert verdict([0.10, 0.10, 0.10], [0.12, 0.12, 0.12], n=480) == "higher"
    assert verdict([0.10], [0.12], n=480) == "tie"
    # the margin says how far past (or inside) the tie floor a verdict is; no floor, no margin
    assert margin([0.054], [0.125], n=480) == "; difference 3.9x the tie floor"
    assert margin([0.131], [0.125], n=480) == "; difference 0.3x the tie floor"
    assert margin([0.1], [0.2], n=0) == ""


def test_tables_list_variants_in_one_order():
    """Every table, whatever order the runs were recorded in: main variants, baselines, then the sweep by K."""
    runs = [("pixel_rf_K1024_s0", "pixel_rf", ["model.codebook_size=1024"]), ("vae_s0", "vae", []),
            ("pixel_cont_s0", "pixel_cont", []), ("pixel_rf_K64_s0", "pixel_rf", ["model.codebook_size=64"]),
            ("pixel_rf_s0", "pixel_rf", []), ("pixel_s0", "pixel", []), ("pixel_repa_s0", "pixel_repa", [])]
    results = {name: {"variant": v, "sets": sets, "fashion": {}} for name, v, sets in runs}
    assert list(group(results, scored="fashion")) == ["pixel", "pixel_rf", "vae", "pixel_repa", "pixel_cont",
                                                      "pixel_rf K=64", "pixel_rf K=1024"]
    assert group(results) == {}  # none carries ShapesEval scores


@pytest.mark.skipif(not fashion.available(), reason="needs Fashion-MNIST: apt install dataset-fashion-mnist")
def test_tiny_fashion_study_scores_with_the_judge(tmp_path, monkeypatch, capsys):
    b = study.Budget(vlm_steps=2, vae_steps=2, steps=2, batch_size=4, seeds=(0,), codebooks=(), per_category=1,
                     n=1, vqa_n=4, preset="tiny", overrides=("train.precision=fp32",), n_fashion=2,
                     fashion_pairs=0.5, n_pairs=2)
    monkeypatch.setitem(study.BUDGETS, "test", b)
    runs, results = tmp_path / "runs", tmp_path / "docs" / "results"
    done = study.ablation("test", runs, results, progress=False, only=["vlm", "vae", "pixel_s0", "pixel_rf_s0"],
                          world="fashion")
    assert {r["name"] for r in done} == {"pixel_s0", "pixel_rf_s0"}
    one = json.loads((results / "fashion_test" / "pixel_rf_s0.json").read_text())
    assert one["world"] == "fashion" and one["config"]["data"]["world"] == "fashion"
    assert 0 <= one["fashion"]["class_accuracy"] <= 1 and one["fashion"]["frechet_distance"] > 0
    assert one["fashion"]["n"] == 2 * len(fashion.CLASSES) and 0 <= one["vqa"] <= 1
    assert one["config"]["data"]["fashion_pairs"] == 0.5  # composites trained and scored
    pairs = one["fashion"]["pairs"]
    assert pairs["n"] == 2 * study.PER_PAIR and 0 <= pairs["pair_accuracy"] <= pairs["item_accuracy"] <= 1
    assert pairs["ceiling"] > 0.6
    assert json.loads((results / "fashion_test" / "vae.json").read_text())["world"] == "fashion"
    # the sampling sweep evaluates as the study does: its `default` row reproduces the recorded scores
    monkeypatch.setattr(sys, "argv", ["fashion_sampling.py", "--runs", str(runs / "fashion_test" / "pixel_rf_s0"),
                                      "--budget", "test", "--settings", "default", "rep_temperature=0.5,cfg=1"])
    capsys.readouterr()
    runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "fashion_sampling.py"), run_name="__main__")
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["setting"] for r in rows] == ["default", "rep_temperature=0.5,cfg=1"]
    assert rows[0]["class_accuracy"] == pytest.approx(one["fashion"]["class_accuracy"], abs=1e-4)
    assert rows[0]["frechet_distance"] == pytest.approx(one["fashion"]["frechet_distance"], abs=1e-3)
    assert rows[0]["pair_accuracy"] == pytest.approx(pairs["pair_accuracy"])
    assert rows[0]["digest"] != rows[1]["digest"]  # the setting reached the sampler
    # the oracle swaps in real images' rep tokens (or pixel_cont's features): a probe, then three conditions
    study.ablation("test", runs, results, progress=False, only=["vae_rf_s0", "pixel_cont_s0"], world="fashion")
    monkeypatch.setattr(sys, "argv", ["fashion_oracle.py", "--budget", "test", "--runs",
                                      *(str(runs / "fashion_test" / r) for r in ("pixel_rf_s0", "vae_rf_s0", "pixel_cont_s0"))])
    runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "fashion_oracle.py"), run_name="__main__")
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["condition"] for r in rows[::4]] == ["token probe", "token probe", "feature probe"]
    assert all(0 <= r["test_accuracy"] <= 1 for r in rows[::4])
    rows = [r for i, r in enumerate(rows) if i % 4]
    assert [r["condition"] for r in rows[-3:]] == ["real features, same class", "real features, next class",
                                                   "real features, shuffled"]
    assert [r["condition"] for r in rows[:3]] == ["real tokens, same class", "real tokens, next class",
                                                  "real tokens, shuffled"]
    assert all(r["n"] == 2 * len(fashion.CLASSES) for r in rows)
    same, following = rows[::3], rows[1::3]
    assert all(r["judged_prompted_class"] == r["judged_token_class"] for r in same)  # one and the same label
    assert all(r["judged_prompted_class"] + r["judged_token_class"] <= 1 for r in following)  # two different labels
    md = write_results_md(results, tmp_path / "docs" / "RESULTS.md").read_text()
    assert "**In progress:** 4 of 6 variant runs recorded" in md
    assert "## Fashion-MNIST, test budget" in md and "| `pixel_rf` |" in md and "not** comparable" in md
    assert "### Two-item composites" in md
    composites = md.split("The paper's claims on the composites")[1].split("Loss curves")[0]
    assert "RF lifts pixel-space generation" in composites and "on composites (" in composites
    assert "RF helps understanding" not in composites  # VQA has its verdict once, with class accuracy


def test_only_splits_the_study_between_workers(tmp_path, monkeypatch, capsys):
    """Two workers side by side: one trains the VAE alone while the other trains the vlm; a worker whose runs need a
    shared run that nobody has recorded or named stops with one line, before training anything."""
    from repforce.cli import main

    b = study.Budget(vlm_steps=2, vae_steps=2, steps=2, batch_size=4, seeds=(0,), codebooks=(), per_category=1,
                     n=1, vqa_n=4, preset="tiny", overrides=("train.precision=fp32",))
    monkeypatch.setitem(study.BUDGETS, "test", b)
    runs, results = tmp_path / "runs", tmp_path / "results"
    assert study.ablation("test", runs, results, progress=False, only=["vae"]) == []
    assert (results / "test" / "vae.json").exists() and (runs / "test" / "vae").exists()
    assert not (results / "test" / "vlm.json").exists() and not (runs / "test" / "vlm").exists()
    args = ["study", "ablation", "--budget", "test", "--runs", str(runs), "--results", str(results), "--quiet"]
    assert main([*args, "--only", "vae_s0"]) == 2
    assert "vae_s0 needs the study's vlm, which is not recorded yet" in capsys.readouterr().err
    assert main([*args, "--only", "pixel_s9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("repforce: error: only=['pixel_s9']: not runs of the test study") and "pixel_rf_s0" in err
    for bad, why in (("pixel_s0", "a run of the plan already"), ("pixl_s1", "not <run>_s<seed>"),
                     ("pixel_sx", "not <run>_s<seed>"), ("pixel_s1", "pixel_s1 needs the study's vlm")):
        assert main([*args, "--extra", bad]) == 2
        assert why in capsys.readouterr().err
    assert not (runs / "test" / "vlm").exists()  # nothing trained by the refused commands
    # another seed of a planned run, outside the plan: it trains alone, and the plan still counts its own runs
    done = study.ablation("test", runs, results, progress=False, only=["vlm"], extra=["pixel_s1"])
    assert [(r["name"], r["seed"], r["config"]["train"]["seed"]) for r in done] == [("pixel_s1", 1, 1)]
    assert sorted(p.name for p in (runs / "test").iterdir()) == ["pixel_s1", "vae", "vlm"]
    g = group(load_results(results / "test"), "shapeseval")
    assert [r["name"] for r in g["pixel"]] == ["pixel_s1"]
    assert progress(g, b)[-1].startswith("**In progress:** 0 of 6 variant runs recorded")


def test_read_log_keeps_the_resumed_leg(tmp_path):
    """Steps logged after the last checkpoint by a leg that was cut off are logged again on resume: the later
    rows win, so curves do not double back."""
    rows = [{"init": "runs/vlm"}, *({"step": s, "loss": 1.0} for s in (10, 20, 30, 40)),
            *({"step": s, "loss": 2.0} for s in (30, 40, 50))]  # cut off at 40, resumed from a step-20 checkpoint
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = read_log(tmp_path)
    assert [r["step"] for r in got] == [10, 20, 30, 40, 50]
    assert [r["loss"] for r in got] == [1.0, 1.0, 2.0, 2.0, 2.0]
    assert read_log(tmp_path / "none") == []


def test_full_plan_is_seed_major_with_the_extra_seeds_last():
    names = [r["name"] for r in study.plan(study.BUDGETS["full"])]
    first = ["pixel_s0", "pixel_rf_s0", "vae_s0", "vae_rf_s0", "pixel_repa_s0", "pixel_cont_s0"]
    assert names[:6] == first and len(names) == len(set(names)) == 18
    assert names[-4:] == ["pixel_rf_K64_s0", "pixel_rf_K1024_s0", "pixel_cont_s1", "pixel_cont_s2"]
    assert [r["name"] for r in study.plan(study.BUDGETS["quick"])][-1] == "pixel_rf_K1024_s0"  # as recorded


def test_loss_figure_keeps_a_term_that_is_zero_throughout_linear(tmp_path):
    """A generation-only run logs loss_lm = 0 at every step: its panel stays linear (a log axis has nothing to
    show and matplotlib warns), while a positive loss gets its log axis."""
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "loss_fm": 1.0 / s, "loss_lm": 0.0} for s in (10, 20, 30)]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = loss_figure({"gen_only": run})
    scales = {ax.get_title(): ax.get_yscale() for ax in fig.axes}
    assert scales == {"loss_fm": "log", "loss_lm": "linear"}
