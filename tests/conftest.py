"""What the tests share: the tiny configurations (model-level and run-level) and a small world tokenizer.

Every run config here pins train.precision=fp32 (the tiny preset does), so numbers compared across
processes or runs do not depend on whether the CPU has fast bf16.
"""

import pytest

from repforce.config import Config, ModelConfig, override
from repforce.data import build_world_tokenizer
from repforce.presets import preset

V = 32  # vocabulary of the model-level tests' made-up token ids


def tiny_model(variant: str = "pixel_rf", **fields) -> ModelConfig:
    """A ModelConfig of a few thousand parameters on 16 x 16 images, for model-level tests."""
    vae = variant.startswith("vae")
    base = dict(variant=variant, vocab_size=V, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
                ffn_hidden=64, image_size=16, enc_dim=32, enc_layers=1, enc_heads=2, enc_patch=4,
                gen_channels=4 if vae else 3, gen_size=4 if vae else 16, gen_patch=1 if vae else 4,
                codebook_size=16, rep_dead_after=20, repa_layer=0, cont_width=32, cont_depth=1)
    return ModelConfig(**{**base, **fields})


def tiny_run(variant: str, *overrides: str, **train) -> Config:
    """The tiny preset of a variant, with train.<k>=<v> for each keyword and dotted overrides."""
    return override(preset("tiny", variant), [f"train.{k}={v}" for k, v in train.items()] + list(overrides))


@pytest.fixture(scope="session")
def world_tok(tmp_path_factory):
    """A world tokenizer on a small corpus (50 scenes), built once per session."""
    return build_world_tokenizer(tmp_path_factory.mktemp("world_tok"), n_scenes=50)
