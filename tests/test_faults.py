"""Faults a training run must survive (issue 22): damaged or foreign checkpoints, a full disk, a read-only folder.

Each damage is named on load with the file it hit; --resume passes over it to the newest usable checkpoint
and the run then ends with the losses of one that never saw the fault; nothing on disk is deleted."""

import errno
import json

import pytest
import torch
from conftest import tiny_run

from repforce import checkpoint
from repforce.cli import main
from repforce.train import RunError, train

SETS = ["train.log_every=1", "train.ckpt_every=4", "train.keep=5"]


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 12-step run: checkpoints at 4, 8 and 12."""
    out = tmp_path_factory.mktemp("straight")
    train(tiny_run("pixel_rf", *SETS, steps=12), out, progress=False)
    return out


def flip_byte(path, at=-100):
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {  # name: (what it does to a step folder, the file the error must name, words it must say)
    "truncated state": (lambda d, other: truncate(d / "state.pt"), "state.pt", "truncated"),
    "flipped bytes": (lambda d, other: flip_byte(d / "model.safetensors"), "model.safetensors", "differ"),
    "missing file": (lambda d, other: (d / "model.safetensors").unlink(), "model.safetensors", "missing"),
    "config of another model": (lambda d, other: (d / "config.json").write_text((other / "config.json").read_text()),
                                "config.json", "replaced"),
    "from another run": (lambda d, other: (d / "checksums.json").write_text(
        (other / "checksums.json").read_text()), "step_", "another run"),
}


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """A checkpoint of another run and another model config."""
    out = tmp_path_factory.mktemp("other")
    train(tiny_run("pixel_rf", "model.dim=32", "train.ckpt_every=100", steps=1), out, progress=False)
    return checkpoint.step_dirs(out / "checkpoints")[-1]


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damage_is_named_on_load(tmp_path, straight, other, damage):
    import shutil

    src = checkpoint.step_dirs(straight / "checkpoints")[-1]
    d = tmp_path / "checkpoints" / src.name
    shutil.copytree(src, d)
    do, names, words = DAMAGES[damage]
    do(d, other)
    with pytest.raises(checkpoint.CheckpointError, match=words) as e:
        checkpoint.verify(d, checkpoint.run_id(straight))
    assert names in str(e.value) and "\n" not in str(e.value)
    checkpoint.verify(src, checkpoint.run_id(straight))  # the original is fine


def test_resume_passes_over_a_damaged_checkpoint_and_ends_like_an_unbroken_run(tmp_path, straight, capsys):
    run = tmp_path / "run"
    train(tiny_run("pixel_rf", *SETS, steps=8), run, progress=False)
    newest = checkpoint.step_dirs(run / "checkpoints")[-1]
    assert newest.name == "step_00000008"
    flip_byte(newest / "state.pt")
    assert main(["train", "--out", str(run), "--resume", "--steps", "12", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "passing over step_00000008" in err and "state.pt" in err and "resuming from step_00000004" in err
    assert losses(run)[-8:] == losses(straight)[-8:]  # steps 5..12 replayed from step 4, as the unbroken run
    kept = list((run / "checkpoints").glob(".replaced_step_00000008_*"))
    assert len(kept) == 1 and (kept[0] / "state.pt").exists()  # the damaged folder is set aside, not deleted
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert any(r.get("resumed_at") == 4 and "state.pt" in r["passed_over"][0] for r in log)


def test_resume_with_no_usable_checkpoint_changes_nothing(tmp_path):
    run = tmp_path / "run"
    train(tiny_run("pixel_rf", *SETS, steps=4), run, progress=False)
    d = checkpoint.step_dirs(run / "checkpoints")[-1]
    truncate(d / "state.pt")
    before = sorted((p.relative_to(run), p.stat().st_size) for p in run.rglob("*") if p.is_file() and p.name != ".lock")
    with pytest.raises(RunError, match="no usable checkpoint.*truncated"):
        train(tiny_run("pixel_rf", *SETS, steps=8), run, resume=True, progress=False)
    after = sorted((p.relative_to(run), p.stat().st_size) for p in run.rglob("*") if p.is_file() and p.name != ".lock")
    assert before == after


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS])
def test_a_save_that_cannot_be_written_is_reported_and_training_goes_on(tmp_path, straight, monkeypatch, capsys, err):
    """The disk fills (or turns read-only) during the step-8 save: the run says so, keeps its state, saves again at
    step 12 and ends with the unbroken run's losses; no temporary folder is left behind."""
    real, calls = torch.save, []

    def failing(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(err, __import__("os").strerror(err))
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing)
    run = tmp_path / "run"
    train(tiny_run("pixel_rf", *SETS, steps=12), run, progress=False)
    assert "could not write checkpoint step_00000008" in capsys.readouterr().err
    assert [d.name for d in checkpoint.step_dirs(run / "checkpoints")] == ["step_00000004", "step_00000012"]
    assert not list((run / "checkpoints").glob(".tmp_*"))
    assert losses(run) == losses(straight)
    s1, _ = checkpoint.read(run / "checkpoints" / "step_00000012")
    s2, _ = checkpoint.read(straight / "checkpoints" / "step_00000012")
    assert all(torch.equal(s1["ema"][k], s2["ema"][k]) for k in s2["ema"])


def test_the_last_save_failing_is_an_error_naming_the_newest_checkpoint(tmp_path, monkeypatch):
    real, calls = torch.save, []

    def failing(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(RunError, match="No space left on device.*newest checkpoint on disk: step_00000004"):
        train(tiny_run("pixel_rf", *SETS, steps=8), tmp_path / "run", progress=False)
    state, _ = checkpoint.read(tmp_path / "run")
    assert state["step"] == 4


def test_an_unwritable_run_folder_is_one_line(tmp_path, monkeypatch, capsys):
    import builtins

    real_open = builtins.open

    def ro(path, *a, **k):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", ro)
    assert main(["train", "--preset", "tiny", "--variant", "vlm", "--steps", "1", "--out", str(tmp_path / "r"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"repforce: error: cannot write to the run folder {tmp_path / 'r'}: Read-only file system"


@pytest.mark.parametrize("point", ["after_state", "after_model", "before_rename"])
def test_kill_9_inside_a_save_resumes_from_the_newest_complete_checkpoint(tmp_path, straight, point):
    """SIGKILL at a named point of the step-8 save (benchmarks/faults.py injects it in a child process): the folder
    being written never counts as a checkpoint, and --resume from step 4 ends with the unbroken run's losses."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    run = tmp_path / "run"
    script = Path(__file__).parents[1] / "benchmarks" / "faults.py"
    argv = ["train", "--quiet", "--preset", "tiny", "--variant", "pixel_rf", "--steps", "12", "--out", str(run)]
    done = subprocess.run([sys.executable, str(script), "--child", point, "2", "--", *argv,
                           *[a for s in SETS for a in ("--set", s)]],
                          env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())),  # this process's numerics
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]
    assert [d.name for d in checkpoint.step_dirs(run / "checkpoints")] == ["step_00000004"]
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 0
    by_step = {}
    for line in (run / "log.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            by_step[r["step"]] = r["loss"]
    assert list(by_step.values()) == losses(straight)


def test_a_checkpoint_saved_before_a_model_option_existed_still_resumes(tmp_path, capsys):
    """A field added to ModelConfig later (und_rope, say) is absent from an older run's config.json: it reads
    as its default, so the run resumes; a field that differs from the run's config still passes it over."""
    run = tmp_path / "run"
    train(tiny_run("pixel_rf", "train.ckpt_every=2", steps=2), run, progress=False)
    d = checkpoint.step_dirs(run / "checkpoints")[-1]
    old = json.loads((d / "config.json").read_text())
    del old["model"]["und_rope"]  # as a run saved before the option existed
    (d / "config.json").write_text(json.dumps(old))
    checkpoint.write_checksums(d, checkpoint.run_id(run))
    assert main(["train", "--out", str(run), "--resume", "--steps", "3", "--quiet"]) == 0
    assert "passing over" not in capsys.readouterr().err
    assert (run / "checkpoints" / "step_00000003").exists()
