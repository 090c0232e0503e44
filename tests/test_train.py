import json

import pytest
import torch
from conftest import tiny_run

from repforce import checkpoint
from repforce import config as C
from repforce.cli import main
from repforce.presets import preset
from repforce.train import train

tiny = tiny_run


def losses(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if '"step"' in line]


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from repforce.train import train_vae

    d = tmp_path_factory.mktemp("vae")
    train_vae(d, steps=3, batch_size=4, progress=False)
    return d


def test_bad_config_values_name_the_field():
    with pytest.raises(C.ConfigError, match="model.variant='pixl'"):
        preset("tiny", "pixl")
    with pytest.raises(C.ConfigError, match="train.steps=-1"):
        C.validate(tiny("pixel", steps=-1))
    with pytest.raises(C.ConfigError, match="image_size"):
        C.override(preset("tiny", "pixel"), ["model.image_size=30"])
    with pytest.raises(C.ConfigError, match="no field 'dimm'"):
        C.override(preset("tiny", "pixel"), ["model.dimm=3"])
    with pytest.raises(C.ConfigError, match="not a valid int"):
        C.override(preset("tiny", "pixel"), ["model.dim=big"])
    with pytest.raises(C.ConfigError, match="train.vae"):
        C.validate(preset("tiny", "vae"))
    for bad, field in (("model.image_rope=3d", "model.image_rope='3d'"), ("model.pos_init=rope", "model.pos_init='rope'"),
                       ("model.loss_t_eps=1.5", "model.loss_t_eps=1.5"), ("model.rep_init=kmean", "model.rep_init='kmean'")):
        with pytest.raises(C.ConfigError, match=field):
            C.override(preset("tiny", "pixel_rf"), [bad])
    assert C.override(preset("tiny", "pixel"), ["optim.betas=0.9,0.99"]).optim.betas == (0.9, 0.99)


def test_cli_rejects_before_work(tmp_path, capsys):
    assert main(["train", "--preset", "tiny", "--variant", "nope", "--out", str(tmp_path / "r")]) == 2
    assert "model.variant='nope'" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--steps", "-3", "--out", str(tmp_path / "r")]) == 2
    assert "train.steps=-3" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_config_round_trip():
    cfg = preset("shapes", "vae_rf")
    assert C.Config.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    assert cfg.model.n_gen == preset("shapes", "pixel").model.n_gen == 64  # latent tokens match pixel tokens


@pytest.mark.parametrize("variant", ["vlm", "pixel", "pixel_rf", "vae", "vae_rf", "pixel_repa", "pixel_cont"])
def test_every_loss_term_falls(variant, tmp_path, tiny_vae):
    kw = {"vae": str(tiny_vae)} if variant.startswith("vae") else {}
    cfg = tiny(variant, steps=60, log_every=1, ckpt_every=1000, **kw)
    cfg = C.override(cfg, ["optim.schedule=constant"])
    train(cfg, tmp_path, progress=False)
    rows = losses(tmp_path)
    terms = [k for k in rows[0] if k.startswith("loss_")]
    expected = {"vlm": {"loss_lm"}, "pixel": {"loss_lm", "loss_fm"}, "pixel_rf": {"loss_lm", "loss_fm", "loss_rep"},
                "vae": {"loss_lm", "loss_fm"}, "vae_rf": {"loss_lm", "loss_fm", "loss_rep"},
                "pixel_repa": {"loss_lm", "loss_fm", "loss_repa"}, "pixel_cont": {"loss_lm", "loss_fm", "loss_cont"}}
    assert set(terms) == expected[variant]
    for k in terms:
        first = sum(r[k] for r in rows[:8]) / 8
        last = sum(r[k] for r in rows[-8:]) / 8
        assert last < first, (k, first, last)


def test_vae_rf_scores_its_oracle_and_rep_reliance_in_latent_space(tmp_path, tiny_vae):
    """The curve scorer's two diagnostics on a vae_rf run: rep tokens of truth renders -> latents -> decoded
    images for the oracle, and the rep-reading gap measured on the latents the pixel stage diffuses."""
    from repforce import engine as E
    from repforce.study import evaluate

    train(tiny("vae_rf", steps=2, ckpt_every=1000, vae=str(tiny_vae)), tmp_path, progress=False)
    eng = E.load(tmp_path, precision="fp32")
    torch.manual_seed(0)
    with torch.no_grad():  # two steps leave near-zero heads: give every weight some signal
        for p in eng.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    r = evaluate.rep_reliance(eng, n=4)
    assert all(v > 0 for v in r["mse_own"].values()) and any(abs(v) > 1e-6 for v in r["gap"].values())
    scores, arr = evaluate.oracle_shapeseval(eng, n=1, options=E.GenOptions(steps=2), per_category=1)
    assert arr.shape[1:] == (eng.cfg.image_size, eng.cfg.image_size, 3) and "overall" in scores


def test_resume_is_bit_for_bit(tmp_path):
    straight, halves = tmp_path / "a", tmp_path / "b"
    cfg = tiny("pixel_rf", steps=12, log_every=1, ckpt_every=6)
    train(cfg, straight, progress=False)
    first = train(C.override(cfg, ["train.steps=6"]), halves, progress=False)
    with pytest.raises(Exception, match="already holds checkpoints"):
        train(cfg, halves, progress=False)  # never clobbers saved work
    second = train(cfg, halves, resume=True, progress=False)
    # the clocks add up over the legs: the summary counts the first leg's time too
    assert second["wall_s"] > first["wall_s"] > 0 and second["cpu_s"] > first["cpu_s"] > 0
    a = [r["loss"] for r in losses(straight)]
    b = [r["loss"] for r in losses(halves)]
    assert len(a) == len(b) == 12
    assert a == b
    sa, _ = checkpoint.read(straight)
    sb, _ = checkpoint.read(halves)
    for k, v in sa["ema"].items():
        assert torch.equal(v, sb["ema"][k]), k


def test_sigterm_saves_the_step_and_resume_goes_on(tmp_path, monkeypatch, capsys):
    """A preempted job (SIGTERM) finishes its step, saves it, exits 143 with a one-line hint; resuming
    gives the same losses as a run that never stopped."""
    import os
    import signal

    from repforce import train as T

    straight, stopped = tmp_path / "a", tmp_path / "b"
    sets = ["train.log_every=1", "train.ckpt_every=100"]  # no periodic checkpoint before the signal
    train(C.override(tiny("pixel_rf", steps=12), sets), straight, progress=False)
    real = T.local_batch

    def preempted(stream, step, *a, **k):
        if step == 7:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during step 8
        return real(stream, step, *a, **k)

    monkeypatch.setattr(T, "local_batch", preempted)
    args = ["train", "--preset", "tiny", "--variant", "pixel_rf", "--steps", "12", "--out", str(stopped), "--quiet"]
    assert main([*args, *[a for s in sets for a in ("--set", s)]]) == 143
    err = capsys.readouterr().err
    assert "stopped by SIGTERM at step 8 of 12" in err and f"repforce train --out {stopped} --resume" in err
    assert [d.name for d in checkpoint.step_dirs(stopped / "checkpoints")] == ["step_00000008"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after the run
    monkeypatch.setattr(T, "local_batch", real)
    assert main(["train", "--out", str(stopped), "--resume", "--quiet"]) == 0
    assert [r["loss"] for r in losses(stopped)] == [r["loss"] for r in losses(straight)]


def test_kill_during_save_keeps_previous(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    model, ema = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    checkpoint.save(root, 5, model, ema, opt, {"a": 1})
    real = torch.save

    def dying(obj, f, *a, **k):
        real(obj, f, *a, **k)
        raise KeyboardInterrupt  # killed right after the state was written

    monkeypatch.setattr(torch, "save", dying)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(root, 10, model, ema, opt, {"a": 2})
    monkeypatch.setattr(torch, "save", real)
    assert [d.name for d in checkpoint.step_dirs(root)] == ["step_00000005"]
    state, cfg = checkpoint.read(root)
    assert state["step"] == 5 and cfg == {"a": 1}
    checkpoint.save(root, 10, model, ema, opt, {}, keep=1)  # the next good save cleans the leftover
    assert [d.name for d in root.iterdir()] == ["step_00000010"]


def test_missing_and_broken_checkpoints(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no such"):
        checkpoint.read(tmp_path / "nope")
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in"):
        checkpoint.read(tmp_path)
    d = tmp_path / "checkpoints" / "step_00000001"
    d.mkdir(parents=True)
    (d / "state.pt").write_bytes(b"garbage")
    (d / "config.json").write_text("{}")
    with pytest.raises(checkpoint.CheckpointError, match="unreadable checkpoint"):
        checkpoint.read(tmp_path)


def test_init_from_vlm_copies_experts(tmp_path):
    vlm = tmp_path / "vlm"
    train(tiny("vlm", steps=3), vlm, progress=False)
    run = tmp_path / "rf"
    train(tiny("pixel_rf", steps=2, init=str(vlm)), run, progress=False)
    info = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    assert info["init"] == str(vlm) and info["loaded"] > 0 and info["copied"] > 0
    assert (run / "tokenizer" / "tokenizer.json").read_text() == (vlm / "tokenizer" / "tokenizer.json").read_text()


def test_a_second_writer_is_refused_with_the_holders_pid_and_a_killed_holder_leaves_no_lock(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from repforce.train import RunError, lock_run

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from repforce.train import lock_run; h = lock_run(Path(sys.argv[1])); print('held', flush=True); "
                               "time.sleep(60)", str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunError, match=f"being trained by another process \\(pid {holder.pid}\\)"):
            train(tiny_run("vlm", "train.steps=1"), out, progress=False)
        assert not (out / "checkpoints").exists()  # refused before touching anything
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    lock_run(out).close()  # the kernel dropped the dead holder's lock
    train(tiny_run("vlm", "train.steps=1"), out, progress=False)
    assert checkpoint.step_dirs(out / "checkpoints")


def test_kmeans_codebook_is_fitted_before_the_first_step_and_never_moves(tmp_path):
    """rep_init=kmeans with momentum 1, no balancing and a held feature centre (recipe shapes-v3):
    the trainer fits every prototype to training features before step 0, and the ids' codebook
    and centre are then the same at every checkpoint, in the weights and in the EMA copy."""
    run = tmp_path / "km"
    cfg = tiny_run("pixel_rf", "model.rep_init=kmeans", "model.rep_momentum=1.0", "model.rep_balance=none",
                   "model.rep_center_momentum=1.0", steps=4, ckpt_every=2)
    train(cfg, run, progress=False)
    fit = [json.loads(line)["kmeans"] for line in (run / "log.jsonl").read_text().splitlines() if '"kmeans"' in line]
    assert len(fit) == 1 and fit[0]["used"] == cfg.model.codebook_size and fit[0]["mean_cos"] > 0.5
    states = [checkpoint.read(d)[0] for d in checkpoint.step_dirs(run / "checkpoints")]
    assert len(states) == 2
    for name in ("quantizer.prototypes", "feat_center.mean"):
        vals = [s[part][name] for s in states for part in ("model", "ema")]
        assert vals[0].abs().sum() > 0 and all(torch.equal(vals[0], v) for v in vals[1:]), name


def test_rep_embed_from_the_connector_is_the_mean_understanding_input_of_each_code():
    """model.rep_embed_init=connector: after the k-means fit, row k of the rep id table is the mean over the
    fit's cells of code k of the understanding path's input to the backbone (cell-averaged), checked cell by cell
    against a loop; a code no cell chose keeps its row; and the option refuses a codebook not fitted to data."""
    from repforce.model import RFModel
    from repforce.quantizer import pool2x2
    from repforce.codebook import embed_codes, fit_quantizer

    cfg = C.validate(tiny_run("pixel_rf", "model.rep_init=kmeans", "model.rep_embed_init=connector",
                              "model.rep_balance=none", "model.codebook_size=8"))
    torch.manual_seed(0)
    model = RFModel(cfg.model)
    side = cfg.model.image_size
    batches = [{"images": torch.rand(4, 3, side, side) * 2 - 1} for _ in range(3)]
    before = model.rep_embed.weight.detach().clone()
    stats = fit_quantizer(model, batches, cfg.model.rep_pool)
    images = torch.cat([b["images"] for b in batches])
    pooled = pool2x2(model.target_features(images), cfg.model.rep_pool)
    ids = (torch.nn.functional.normalize(pooled, dim=-1) @ model.quantizer.prototypes.T).argmax(-1)  # (n, M)
    seen = pool2x2(model.embed_image(images), cfg.model.rep_pool)  # (n, M, D)
    used = 0
    for k in range(cfg.model.codebook_size):
        cells = [seen[i, j] for i in range(ids.shape[0]) for j in range(ids.shape[1]) if ids[i, j] == k]
        want = torch.stack(cells).mean(0) if cells else before[k]
        used += bool(cells)
        torch.testing.assert_close(model.rep_embed.weight[k], want, atol=1e-5, rtol=1e-4)
    assert stats["rep_embed_from_connector"] == used == cfg.model.codebook_size  # k-means leaves no code empty
    model.quantizer.prototypes[1] = model.quantizer.prototypes[0]  # ties go to code 0: code 1 gets no cell
    row = model.rep_embed.weight[1].detach().clone()
    assert embed_codes(model, batches, pooled, cfg.model.rep_pool) == cfg.model.codebook_size - 1
    assert torch.equal(model.rep_embed.weight[1], row)
    with pytest.raises(ValueError, match="rep_embed_init.*kmeans"):
        C.validate(tiny_run("pixel_rf", "model.rep_init=random", "model.rep_embed_init=connector"))


def _poison(monkeypatch, bad_calls):
    """RFModel.forward returns a NaN loss on the given (1-based) calls; the rest are untouched."""
    from repforce.model import RFModel

    real, calls = RFModel.forward, [0]

    def forward(self, batch):
        out = real(self, batch)
        calls[0] += 1
        if calls[0] in bad_calls:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(RFModel, "forward", forward)


def test_a_non_finite_step_is_skipped_counted_and_never_reaches_the_weights_or_the_ema(tmp_path, monkeypatch):
    _poison(monkeypatch, {3, 4})
    run = tmp_path / "nan"
    summary = train(tiny_run("pixel_rf", steps=6, log_every=1, precision="fp32"), run, progress=False)
    assert summary["step"] == 6 and summary["skipped_nonfinite"] == 2
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "skipped" in r] == [3, 4]
    state, _ = checkpoint.read(run / "checkpoints")
    for part in ("model", "ema"):
        assert all(torch.isfinite(v).all() for v in state[part].values() if v.is_floating_point()), part


def test_non_finite_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch):
    from repforce.train import RunError

    _poison(monkeypatch, {5, 6, 7})
    run = tmp_path / "nan"
    with pytest.raises(RunError, match="3 steps in a row with a non-finite loss"):
        train(tiny_run("pixel_rf", "train.max_bad_steps=3", steps=10, ckpt_every=2, precision="fp32"), run,
              progress=False)
    assert [d.name for d in checkpoint.step_dirs(run / "checkpoints")][-1] == "step_00000004"
    state, _ = checkpoint.read(run / "checkpoints")
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["ema"].values() if v.is_floating_point())
