import json

from repforce.cli import main


def test_world_preview(tmp_path, capsys):
    assert main(["world", "preview", "--n", "4", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "preview.png").stat().st_size > 1000
    scenes = json.loads((tmp_path / "scenes.json").read_text())
    assert len(scenes) == 4 and all(s["caption"] and s["qa"] for s in scenes)


def test_eval_shapes_cli(tmp_path, capsys):
    assert main(["world", "truth", "--out", str(tmp_path), "--n", "1"]) == 0
    assert main(["eval", "shapes", "--images", str(tmp_path), "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert "overall        1.0000" in out and "complete" in out
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["complete"] and len(res["images"]) == 360
    (tmp_path / "00007" / "samples" / "0000.png").unlink()
    assert main(["eval", "shapes", "--images", str(tmp_path), "--n", "1"]) == 0
    assert "INCOMPLETE: 1 of 360" in capsys.readouterr().out
    assert main(["eval", "shapes", "--images", str(tmp_path), "--n", "1", "--strict"]) == 2
    assert main(["eval", "shapes", "--images", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_train_init_takes_a_shipped_stage_by_name(tmp_path, capsys, monkeypatch):
    import repforce.cli as cli
    from repforce import checkpoint

    seen = []
    monkeypatch.setattr(cli, "train", lambda cfg, out, **kw: seen.append(cfg) or {"step": 0})
    monkeypatch.setattr(cli, "is_main", lambda: False)  # no summary printing
    assert main(["train", "--preset", "shapes", "--variant", "pixel_rf", "--init", "shapes_vlm", "--steps", "1",
                 "--out", str(tmp_path / "r")]) == 0
    assert seen[0].train.init == str(checkpoint.resolve("shapes_vlm")) and checkpoint.resolve("shapes_vlm").is_dir()
    assert main(["train", "--preset", "tiny", "--init", "no_such_stage", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "no such run folder or shipped model: no_such_stage" in err and "shapes_vlm" in err
