"""Data parallelism on CPU: 2 gloo ranks under torchrun vs one process, sharded checkpoints, the scale path.
Run: pytest tests/test_distributed.py"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from repforce import checkpoint, data
from repforce import config as C
from repforce.presets import preset
from repforce.quantizer import balance_scores
from repforce.sequence import Layout
from repforce.train import train

STEPS = ["--steps", "6", "--set", "train.log_every=1", "--set", "train.ckpt_every=3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "repforce.cli", "train", "--quiet", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def rows(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if '"step"' in line]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 6 steps of `tiny` pixel_rf on 2 ranks (torchrun, FSDP2) and in one process."""
    root = tmp_path_factory.mktemp("dp")
    torchrun("--preset", "tiny", "--variant", "pixel_rf", "--out", str(root / "two"), *STEPS)
    cfg = C.override(preset("tiny", "pixel_rf"), ["train.steps=6", "train.log_every=1", "train.ckpt_every=3"])
    train(cfg, root / "one", progress=False)
    return root


@pytest.mark.slow
def test_two_ranks_give_the_losses_of_one_process(runs):
    one, two = rows(runs / "one"), rows(runs / "two")
    assert [r["step"] for r in two] == list(range(1, 7))
    for a, b in zip(one, two):
        for k in ("loss", "loss_lm", "loss_rep", "loss_fm", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (a["step"], k)
        assert a["rep_used"] == b["rep_used"]  # the codebook statistics span both ranks
    sharded = checkpoint.step_dirs(runs / "two" / "checkpoints")[-1]
    assert checkpoint.is_sharded(sharded) and json.loads((sharded / "meta.json").read_text())["world_size"] == 2
    # the EMA export is the single-process EMA, under the same names
    ema_two = load_file(str(sharded / "model.safetensors"))
    ema_one, _ = checkpoint.read(runs / "one")
    assert set(ema_two) == set(ema_one["ema"])
    for k, v in ema_one["ema"].items():
        # atol 1e-5: the two runs sum gradients in different orders, and Adam turns a last-bit difference in a
        # near-zero gradient into up to 1.5e-6 of weight after 6 steps on AVX-512 hosts (weights ~0.07 here);
        # a sharding mistake moves weights by ~lr = 3e-3
        assert torch.allclose(ema_two[k], v, rtol=1e-4, atol=1e-5), k


@pytest.mark.slow
def test_a_two_rank_save_resumes_on_one(runs, tmp_path):
    import shutil

    run = tmp_path / "resumed"
    shutil.copytree(runs / "two", run)
    shutil.rmtree(run / "checkpoints" / "step_00000006")  # back to the step-3 sharded checkpoint
    from repforce.train import load_run_config

    cfg = load_run_config(run)
    train(cfg, run, resume=True, progress=False)
    resumed = rows(run)[-3:]
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for a, b in zip(rows(runs / "two")[3:], resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), a["step"]
    import repforce

    assert repforce.load(runs / "two").model.cfg.variant == "pixel_rf"  # sampling reads the sharded run's export


@pytest.mark.slow
def test_scale_path_on_two_ranks(tmp_path):
    """Meta-device init, FSDP2, activation checkpointing, a pretrained Qwen3-MoE + DINOv3 and the LLM's
    tokenizer, on 2 ranks: the exported weights are the pretrained ones (lr ~ 0, 3 steps). One sample per
    rank, so a rank often has no generation or no understanding sample: the uniform path (model.py)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    llm, vit = tmp_path / "llm", tmp_path / "vit"
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    raw.train_from_iterator(["two red circles above a blue square"] * 10, trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>",
                                                  pad_token="<|endoftext|>")
    hf_tok.save_pretrained(str(llm))
    torch.manual_seed(0)
    hf = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        vocab_size=len(hf_tok) + 8, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_experts=4,
        num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    hf.save_pretrained(str(llm))
    transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, patch_size=4,
        num_register_tokens=1)).save_pretrained(str(vit))
    out = tmp_path / "run"
    torchrun("--preset", "tiny", "--variant", "pixel_rf", "--out", str(out), "--steps", "3", "--batch-size", "2",
             "--set", f"train.llm={llm}", "--set", f"train.vision={vit}", "--set", "train.meta_init=true",
             "--set", "train.act_ckpt=true", "--set", "optim.lr=1e-12", "--set", "optim.weight_decay=0")
    saved = json.loads((out / "config.json").read_text())["model"]
    assert saved["moe_experts"] == 4 and saved["encoder"] == "dinov3" and saved["dim"] == 32
    ema = load_file(str(checkpoint.step_dirs(out / "checkpoints")[-1] / "model.safetensors"))
    ref = hf.state_dict()
    for e in range(3):  # every MoT expert is the LLM's bank
        ours = f"backbone.layers.1.mlp.experts.{e}"
        assert torch.allclose(ema[f"{ours}.gate.weight"], ref["model.layers.1.mlp.gate.weight"])
        assert torch.allclose(ema[f"{ours}.down_proj"], ref["model.layers.1.mlp.experts.down_proj"], atol=1e-6)
    q = "layers.0.self_attn.q_proj.weight"
    assert torch.allclose(ema[f"backbone.{q}"], ref[f"model.{q}"])
    assert "encoder.model.model.layer.1.mlp.up_proj.weight" in ema
    assert (out / "tokenizer" / "tokenizer.json").exists()


def test_local_batch_counts_and_seeds():
    import tempfile

    from repforce.data import WorldStream as ShapesStream
    from repforce.data import build_world_tokenizer

    cfg = preset("tiny", "pixel_rf")
    with tempfile.TemporaryDirectory() as d:
        tok = build_world_tokenizer(d, n_scenes=50)
    stream = ShapesStream(cfg.data, tok, Layout.for_model(cfg.model))
    b = data.local_batch(stream, 3, 8, seed=5, device=torch.device("cpu"))
    assert b["noise_seed"].tolist() == [5 * 1_000_003 + 24 + i for i in range(8)]
    assert float(b["norm_lm"]) == float((b["text_targets"] != -100).sum())
    assert float(b["norm_gen"]) == float(b["is_gen"].sum())
    half = stream.batch(3, 8, rank=1, world=2)  # the second half of the same global batch
    assert torch.equal(half["is_gen"], b["is_gen"][4:])


def test_global_balancing_equals_the_printed_softmax():
    s = torch.randn(50, 7)
    assert torch.allclose(balance_scores(s, "softmax", all_sum=lambda t: t), balance_scores(s, "softmax"), atol=1e-6)
    assert torch.allclose(balance_scores(s, "sinkhorn", 3, all_sum=lambda t: t), balance_scores(s, "sinkhorn", 3))


def test_export_streams_a_valid_safetensors(tmp_path):
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    checkpoint.export_ema(m, tmp_path / "w.safetensors")
    back = load_file(str(tmp_path / "w.safetensors"))
    assert set(back) == set(m.state_dict())
    assert all(torch.equal(back[k], v) for k, v in m.state_dict().items())
    checkpoint.export_ema(m, tmp_path / "h.safetensors", dtype=torch.bfloat16)
    assert load_file(str(tmp_path / "h.safetensors"))["0.weight"].dtype == torch.bfloat16
