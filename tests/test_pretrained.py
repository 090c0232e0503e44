"""Pretrained weights from local folders: tiny random Qwen3 / Qwen3-MoE / DINOv3 / SigLIP2 built here,
saved with save_pretrained, loaded into repforce, compared with transformers.  Run: pytest tests/test_pretrained.py"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from repforce import pretrained  # noqa: E402
from repforce.backbone import causal_mask  # noqa: E402
from repforce.config import ModelConfig  # noqa: E402
from repforce.model import RFModel  # noqa: E402
from repforce.tokenizer import load_tokenizer  # noqa: E402

SMALL = dict(image_size=16, enc_patch=4, enc_dim=16, enc_layers=1, enc_heads=2, gen_size=16, gen_patch=4,
             codebook_size=8, cont_width=8)


def save_llm_tokenizer(folder):
    """A byte-level BPE with only an <|endoftext|> special, like an LLM's own tokenizer (no BOS, no image tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(["a red circle left of a blue square", "what color is the cat?"] * 20, trainer=trainer)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>",
                                              pad_token="<|endoftext|>")
    hf.save_pretrained(str(folder))
    return len(hf)


def nontrivial_norms(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)


def make_llm(folder, moe: bool, tie: bool):
    n_tok = save_llm_tokenizer(folder)
    common = dict(vocab_size=n_tok + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, tie_word_embeddings=tie,
                  attn_implementation="eager")  # vocab_size > tokenizer: padding rows, as in Qwen3
    torch.manual_seed(0)
    if moe:
        cfg = transformers.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=24, num_experts=6,
                                          num_experts_per_tok=2, norm_topk_prob=True, **common)
        hf = transformers.Qwen3MoeForCausalLM(cfg)
        with torch.no_grad():  # transformers leaves routers at zero: random ones make top-k routing matter
            for layer in hf.model.layers:
                layer.mlp.gate.weight.normal_(std=0.5)
    else:
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(intermediate_size=48, **common))
    nontrivial_norms(hf)
    hf.save_pretrained(str(folder))
    return hf.eval(), n_tok


def repforce_from(folder, **over):
    tok = load_tokenizer(folder)
    fields = pretrained.llm_fields(folder) | {"vocab_size": pretrained.vocab_size(folder, tok)}
    cfg = ModelConfig(variant="pixel_rf", **(SMALL | fields | over))
    model = RFModel(cfg).eval()
    report = pretrained.load_hf(model, llm=folder)
    return model, tok, report


@pytest.mark.parametrize("moe,tie", [(False, True), (True, False)], ids=["qwen3", "qwen3_moe"])
def test_backbone_logits_equal_huggingface(tmp_path, moe, tie):
    hf, n_tok = make_llm(tmp_path, moe, tie)
    model, tok, report = repforce_from(tmp_path)
    assert model.cfg.moe_experts == (6 if moe else 0) and model.cfg.tie_embeddings == tie
    # our special tokens were added after the LLM's own, inside its padding rows, and they start at the mean
    assert len(tok) == n_tok + 5 and model.cfg.vocab_size == hf.config.vocab_size
    assert {tok.bos_id, tok.boi_id, tok.eoi_id, tok.img_start_id, tok.img_end_id} == set(range(n_tok, n_tok + 5))
    emb = model.backbone.embed_tokens.weight
    hf_emb = hf.model.embed_tokens.weight
    assert torch.equal(emb[:n_tok], hf_emb[:n_tok])
    assert torch.allclose(emb[n_tok:], hf_emb[:n_tok].mean(0).expand(5, -1), atol=1e-7)
    assert "backbone.embed_tokens.weight" in report["vocab_mean"]

    ids = torch.randint(0, n_tok, (2, 13))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits  # (B, L, V)
        pos = torch.arange(13).expand(2, 13)
        experts = torch.randint(0, 3, (2, 13))  # all three MoT experts are copies of the LLM's FFN (or bank)
        h = model.backbone(model.embed_text(ids), experts, causal_mask(2, 13), pos)
        got = model.lm_logits(h)
    assert got.shape == expected.shape
    assert torch.allclose(got[..., :n_tok], expected[..., :n_tok], atol=2e-5, rtol=1e-4), \
        (got - expected).abs().max()


def test_moe_bank_and_router_are_copied(tmp_path):
    hf, _ = make_llm(tmp_path, moe=True, tie=False)
    model, _, _ = repforce_from(tmp_path)
    mlp = model.backbone.layers[1].mlp
    hf_mlp = hf.model.layers[1].mlp
    for e in range(3):
        bank = mlp.experts[e]
        assert torch.equal(bank.gate.weight, hf_mlp.gate.weight)
        gate, up = hf_mlp.experts.gate_up_proj.chunk(2, dim=1)  # transformers 5 holds them fused
        assert torch.equal(bank.gate_proj, gate) and torch.equal(bank.up_proj, up)
        assert torch.equal(bank.down_proj, hf_mlp.experts.down_proj)


def test_bad_folders_say_why(tmp_path):
    with pytest.raises(pretrained.PretrainedError, match="no config.json"):
        pretrained.llm_fields(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(pretrained.PretrainedError, match="expected qwen3"):
        pretrained.llm_fields(tmp_path)
    hf, _ = make_llm(tmp_path / "q", moe=False, tie=False)
    tok = load_tokenizer(tmp_path / "q")
    fields = pretrained.llm_fields(tmp_path / "q") | {"vocab_size": len(tok) + 10, "dim": 64, "head_dim": 16}
    model = RFModel(ModelConfig(**(SMALL | fields)))
    with pytest.raises(pretrained.PretrainedError, match="shape"):
        pretrained.load_hf(model, llm=tmp_path / "q")


def images(n=2, side=16):
    torch.manual_seed(1)
    return torch.rand(n, 3, side, side) * 2 - 1


def test_dinov3_features_equal_huggingface(tmp_path):
    cfg = transformers.DINOv3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       patch_size=4, num_register_tokens=2, image_size=16, layerscale_value=0.5)
    torch.manual_seed(0)
    hf = transformers.DINOv3ViTModel(cfg).eval()
    hf.save_pretrained(str(tmp_path))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(  # as the processor writes it (no torchvision here)
        {"image_processor_type": "DINOv3ViTImageProcessorFast", "image_mean": [0.4, 0.5, 0.6],
         "image_std": [0.2, 0.3, 0.25], "size": {"height": 16, "width": 16}}))
    fields = pretrained.encoder_fields(tmp_path)
    assert fields["encoder"] == "dinov3" and fields["enc_mean"] == (0.4, 0.5, 0.6) and fields["enc_dim"] == 32
    model = RFModel(ModelConfig(**(SMALL | fields))).eval()
    report = pretrained.load_hf(model, vision=tmp_path)
    assert any(n.startswith("ema_encoder.") for n in report["loaded"])
    x = images()
    mean, std = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1), torch.tensor([0.2, 0.3, 0.25]).view(1, 3, 1, 1)
    with torch.no_grad():
        out = hf(pixel_values=((x + 1) / 2 - mean) / std, output_hidden_states=True)
        pre, normed = model.encoder(x)
        pre_ema, _ = model.ema_encoder(x)
        model.train()  # deterministic in training too: the RoPE augmentations are off
        pre_train, _ = model.encoder(x)
    n_prefix = 1 + 2  # CLS + registers are dropped
    assert pre.shape == (2, 16, 32)
    assert torch.allclose(normed, out.last_hidden_state[:, n_prefix:], atol=1e-5)
    assert torch.allclose(pre, out.hidden_states[-1][:, n_prefix:], atol=1e-5)
    assert torch.equal(pre, pre_ema) and torch.equal(pre, pre_train)


@pytest.mark.parametrize("full", [False, True], ids=["vision_model", "full_siglip2"])
def test_siglip2_features_equal_huggingface(tmp_path, full):
    vcfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=4,
                num_patches=16, num_channels=3)
    torch.manual_seed(0)
    if full:
        cfg = transformers.Siglip2Config(
            text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             vocab_size=50, max_position_embeddings=16), vision_config=vcfg)
        hf_full = transformers.Siglip2Model(cfg).eval()
        hf_full.save_pretrained(str(tmp_path))
        hf = hf_full.vision_model
    else:
        hf = transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(**vcfg)).eval()
        hf.save_pretrained(str(tmp_path))
    fields = pretrained.encoder_fields(tmp_path)
    assert fields["encoder"] == "siglip2" and fields["enc_mean"] == (0.5, 0.5, 0.5)  # SigLIP2's default
    model = RFModel(ModelConfig(**(SMALL | fields))).eval()
    pretrained.load_hf(model, vision=tmp_path)
    x = images()
    from repforce.encoder import patchify

    with torch.no_grad():
        out = hf(pixel_values=patchify(x, 4), pixel_attention_mask=torch.ones(2, 16, dtype=torch.long),
                 spatial_shapes=torch.tensor([[4, 4], [4, 4]]), output_hidden_states=True)
        pre, normed = model.encoder(x)
    assert torch.allclose(normed, out.last_hidden_state, atol=1e-5)
    assert torch.allclose(hf.post_layernorm(pre), out.last_hidden_state, atol=1e-5)
    if out.hidden_states is not None:
        assert torch.allclose(pre, out.hidden_states[-1], atol=1e-5)


def test_vae_folder_geometry(tmp_path):
    from repforce.vae import load_vae, make_vae

    make_vae(latent_channels=4, widths=(16, 16, 16, 16), canvas=32).save_pretrained(str(tmp_path))  # 8x down
    geo = pretrained.vae_fields(tmp_path, image_size=256)
    assert geo == {"gen_channels": 4, "gen_size": 32, "gen_patch": 2}  # 16 x 16 latent tokens, as 16-px patches
    cfg = ModelConfig(variant="vae_rf", image_size=256, enc_patch=16, **geo)
    assert cfg.n_gen == (256 // 16) ** 2
    assert load_vae(tmp_path).config.latent_channels == 4


def test_missing_vae_names_the_folder_and_the_fix(tmp_path):
    from repforce.vae import load_vae

    with pytest.raises(FileNotFoundError, match=r"train-vae --out .*nowhere"):
        load_vae(tmp_path / "nowhere")
