"""Scale presets (meta-device builds, parameter counts, stages) and the GPU benchmark's CPU smoke run.
Run: pytest tests/test_presets.py"""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from repforce import config as C
from repforce import presets
from repforce.presets import preset


def test_presets_build_on_meta_with_expected_counts():
    big = presets.count_params(preset("scale_s2"))
    assert 3.0e9 < big["active"] < 3.6e9  # Qwen3-30B-A3B: 3.3B activated
    assert 85e9 < big["backbone"] < 92e9  # 30.5B with its expert banks in three MoT copies
    assert 0.8e9 < big["encoder"] < 0.9e9  # DINOv3 ViT-H+/16: 840M
    small = presets.count_params(preset("scale_small_s2"))
    assert 0.55e9 < small["active"] < 0.65e9 and 1.0e9 < small["backbone"] < 1.3e9
    assert 0.02e9 < small["encoder"] < 0.025e9  # ViT-S/16: 21.6M
    s1 = preset("scale_s1", "vlm")
    assert 29e9 < presets.count_params(s1)["backbone"] < 31.5e9  # one expert: the LLM itself
    m = preset("scale_s2").model
    assert (m.codebook_size, m.gen_patch, m.enc_patch, m.rep_pool, m.n_gen, m.n_rep) == (16384, 16, 16, 2, 256, 64)
    assert preset("scale_s3").model.image_size > m.image_size
    assert replace(m, vocab_size=10).vocab_size == 10  # frozen, replaceable like every ModelConfig


def test_stages_follow_the_recipe():
    s1, s2, s3 = (preset(f"scale_small_s{n}", "vlm" if n == 1 else "pixel_rf") for n in (1, 2, 3))
    assert s1.model.variant == "vlm" and s1.train.train_only == "connector." and s1.data.gen_fraction == 0
    assert s2.optim.lr == 5e-5 and s3.optim.lr == 2.5e-5 and s2.optim.gen_lr_mult == 4.0
    assert s2.train.train_only == "" and s3.model.image_size > s2.model.image_size
    assert s2.optim.betas == (0.9, 0.95) and s2.optim.weight_decay == 0.1 and s2.optim.clip == 1.0
    assert all(s.train.meta_init and s.data.world == "mix" for s in (s1, s2, s3))
    assert preset("scale_s3").model.image_size == 1024  # the paper's last stage


def test_scale_presets_use_the_printed_quantizer():
    """Appendix B as printed, in every scale preset; and a tiny model with that quantizer trains a step."""
    import torch
    from conftest import tiny_model
    from test_model import make_batch

    from repforce.model import RFModel

    printed = dict(rep_temperature=0.5, rep_momentum=0.9999, rep_balance="softmax", rep_balance_stats="batch",
                   rep_init="random", rep_dead_after=0, rep_center=False)
    assert presets.PAPER_QUANTIZER == printed
    for name in (n for n in presets.PRESETS if n.startswith("scale")):
        m = preset(name).model
        assert {k: getattr(m, k) for k in printed} == printed, name
    torch.manual_seed(0)
    model = RFModel(tiny_model("pixel_rf", **printed))
    assert not hasattr(model, "feat_center")  # no centering
    before = model.quantizer.prototypes.clone()
    out = model(make_batch(model.cfg))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["loss_rep"] > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    moved = (model.quantizer.prototypes - before).norm(dim=1)  # (K,)
    assert 0 < moved.max() < 1e-3  # momentum 0.9999: a step of about 1e-4 toward the assigned features
    assert (moved[model.quantizer.unused > 0] == 0).all()  # prototypes that got no feature stay as they were

def test_gpu_benchmark_smoke_runs_on_cpu():
    script = Path(__file__).parent.parent / "benchmarks" / "gpu_small_preset.py"
    done = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True, timeout=120,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["what"] == "summary" and summary["finite"] and summary["tokens_per_s"] > 0


def test_three_stages_chain_on_cpu(tmp_path):
    """Stage 1 trains the connector alone, stage 2 starts from stage 1 (MoT experts copied), stage 3 from
    stage 2 at twice the resolution (learned position tables resized): the recipe on the tiny model."""
    import torch

    from repforce import checkpoint
    from repforce.model import RFModel
    from repforce.train import train

    base = ["train.log_every=1", "train.ckpt_every=100", "optim.warmup=0"]
    s1 = C.override(preset("tiny", "vlm"), base + ["train.steps=3", "train.train_only=connector."])
    train(s1, tmp_path / "s1", progress=False)
    state, saved = checkpoint.read(tmp_path / "s1")
    torch.manual_seed(s1.train.seed)
    fresh = RFModel(C.Config.from_json(saved).model).state_dict()
    moved = {k for k, v in state["model"].items() if not torch.equal(v, fresh[k])}
    assert moved and all(k.startswith("connector.") for k in moved), moved

    s2 = C.override(preset("tiny", "pixel_rf"), base + ["train.steps=2", f"train.init={tmp_path / 's1'}",
                                                        "train.freeze=encoder."])
    train(s2, tmp_path / "s2", progress=False)
    info = json.loads((tmp_path / "s2" / "log.jsonl").read_text().splitlines()[0])
    assert info["copied"] > 0 and info["loaded"] > 0  # generation experts start as the understanding expert
    state2, _ = checkpoint.read(tmp_path / "s2")
    enc = [k for k in state2["model"] if k.startswith("encoder.")]
    assert enc and all(torch.equal(state2["model"][k], state["ema"][k]) for k in enc)  # train.freeze held it

    # train_only=generation (the demo's pixel stage): every weight the understanding path reads stays as loaded,
    # in the model and its EMA, and the generation experts move from their copies of expert 0
    from repforce.trainable import is_gen_param
    sg = C.override(preset("tiny", "pixel_rf"), base + ["train.steps=2", f"train.init={tmp_path / 's1'}",
                                                        "train.train_only=generation", "data.gen_fraction=1.0"])
    train(sg, tmp_path / "sg", progress=False)
    state_g, _ = checkpoint.read(tmp_path / "sg")
    shared = [k for k in state["ema"] if k in state_g["model"] and not is_gen_param(k)]
    assert any(".self_attn." in k for k in shared) and any(".experts.0." in k for k in shared)
    for key in ("model", "ema"):
        assert all(torch.equal(state_g[key][k], state["ema"][k]) for k in shared), key
    with pytest.raises(C.ConfigError, match="train.train_only='generation'"):  # a vlm has nothing to train so
        C.validate(C.override(preset("tiny", "vlm"), ["train.train_only=generation"]))
    gen = [k for k in state_g["model"] if ".experts.2." in k]
    assert gen and any(not torch.equal(state_g["model"][k], state["ema"][k.replace(".experts.2.", ".experts.0.")])
                       for k in gen)

    s3 = C.override(preset("tiny", "pixel_rf"), base + [
        "train.steps=2", f"train.init={tmp_path / 's2'}", "model.image_size=64", "model.gen_size=64",
        "data.canvas=64", "optim.lr=1e-4"])
    train(s3, tmp_path / "s3", progress=False)
    info = json.loads((tmp_path / "s3" / "log.jsonl").read_text().splitlines()[0])
    assert info["resized"] >= 3  # gen_pos, rep_pos, the encoder's position table (and its EMA copy)
    rows = [json.loads(x) for x in (tmp_path / "s3" / "log.jsonl").read_text().splitlines() if '"step"' in x]
    assert len(rows) == 2 and all(r["loss"] == r["loss"] for r in rows)
