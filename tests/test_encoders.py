"""Pretrained world encoders: cell labels, the shipped encoder's checksum and probe, loading into a model.

    pytest tests/test_encoders.py
"""

import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import tiny_run

from repforce import config as C
from repforce import pretrained
from repforce.encoder import ImageEncoder
from repforce.model import RFModel
from repforce.presets import preset
from repforce.worlds import encoders, shapes

SHIPPED = pretrained.ASSETS / "shapes_encoder"


def test_cell_labels_read_the_scene_graph():
    scene = shapes.Scene((shapes.Obj("square", "blue", "large", 8.0, 8.0),
                          shapes.Obj("circle", "red", "small", 24.0, 24.0)), canvas=32)
    lab = encoders.cell_labels(scene, 8)
    assert lab["color"][2, 2] == 1 + shapes.COLORS.index("blue") and lab["shape"][2, 2] == 1 + shapes.SHAPES.index("square")
    assert lab["color"][6, 6] == 1 + shapes.COLORS.index("red") and lab["size"][6, 6] == 1
    assert lab["color"][0, 7] == 0 and lab["shape"][7, 0] == 0  # background corners
    assert lab["center"].sum() == 2 and lab["center"][2, 2] == 1 and lab["center"][6, 6] == 1
    assert (lab["cover"][lab["color"] > 0] >= encoders.UNDER).all()


def test_shipped_encoder_has_its_checksum_and_a_readable_probe():
    state, meta = pretrained.world_encoder_state("shapes_encoder")
    assert meta["version"] == encoders.VERSION and SHIPPED.joinpath("encoder.safetensors").stat().st_size < 5e6
    e = meta["encoder"]
    enc = ImageEncoder(e["image_size"], e["patch"], 3, e["dim"], e["n_layers"], e["n_heads"])
    enc.load_state_dict(state)
    acc = encoders.probe(enc, n_train=400, n_test=150, steps=150)  # a small held-out set
    assert acc["color"] >= 0.95 and acc["shape"] >= 0.95, acc


def test_the_probe_reads_position_where_the_features_carry_it():
    """targets row/column: features that are the patch's own index read at 1.0; features blind to where the patch
    sits (its pixels' mean color) read its row near chance (1/8), however well they read color."""

    class Stub(torch.nn.Module):
        grid = 8

        def __init__(self, where: bool):
            super().__init__()
            self.where = where

        def forward(self, x):
            n = x.shape[0]
            if self.where:
                f = torch.eye(64).expand(n, -1, -1)
            else:
                f = torch.nn.functional.avg_pool2d(x, 4).flatten(2).transpose(1, 2)  # (n, 64, 3)
            return f, f

    kw = dict(n_train=60, n_test=30, steps=100, targets=("row", "column"))
    assert encoders.probe(Stub(True), **kw) == {"row": 1.0, "row_all": 1.0, "column": 1.0, "column_all": 1.0}
    blind = encoders.probe(Stub(False), **kw)
    assert blind["row_all"] < 0.3 and blind["column_all"] < 0.3, blind


def test_a_tampered_encoder_is_refused(tmp_path):
    d = tmp_path / "enc"
    shutil.copytree(SHIPPED, d)
    raw = bytearray((d / "encoder.safetensors").read_bytes())
    raw[-1] ^= 1
    (d / "encoder.safetensors").write_bytes(bytes(raw))
    with pytest.raises(pretrained.PretrainedError, match="sha256"):
        pretrained.world_encoder_state(d)
    with pytest.raises(pretrained.PretrainedError, match="no encoder.safetensors"):
        pretrained.world_encoder_state(tmp_path / "nothing")


def test_the_shapes_model_starts_from_it_and_a_wrong_shape_is_named():
    state, _ = pretrained.world_encoder_state("shapes_encoder")
    model = RFModel(preset("shapes", "pixel_rf").model)
    report = pretrained.load_world_encoder(model, "shapes_encoder")
    assert "encoder.patch_embed.weight" in report["loaded"] and "ema_encoder.patch_embed.weight" in report["loaded"]
    for k, v in state.items():
        assert torch.equal(model.encoder.state_dict()[k], v) and torch.equal(model.ema_encoder.state_dict()[k], v)
    with pytest.raises(pretrained.PretrainedError, match="set the model's encoder fields"):
        pretrained.load_world_encoder(RFModel(tiny_run("pixel_rf").model), "shapes_encoder")
    with pytest.raises(pretrained.PretrainedError, match="trained on the shapes world, this run is data.world=fashion"):
        pretrained.load_world_encoder(model, "shapes_encoder", world="fashion")


def test_the_shapes_preset_is_recipe_v7_and_v1_to_v6_stay_as_recorded():
    v7, v7vlm = preset("shapes", "pixel_rf"), preset("shapes", "vlm")
    assert v7.recipe == "shapes-v7" and C.Config.from_json(v7.to_json()).recipe == "shapes-v7"
    v6, v6vlm = preset("shapes_v6", "pixel_rf"), preset("shapes_v6", "vlm")
    assert (v7.data.relation_scenes, v7vlm.data.relation_scenes, v6.data.relation_scenes) == (0.5, 0.5, 0.0)
    assert v7.model == v6.model and v7.train == v6.train and replace(v7.data, relation_scenes=0.0) == v6.data
    assert v6.recipe == "shapes-v6" and C.Config.from_json(v6.to_json()).recipe == "shapes-v6"
    assert (v6.data.relation_turns, v6vlm.data.relation_turns) == (3, 3)  # v6: relation questions first
    v5, v5vlm = preset("shapes_v5", "pixel_rf"), preset("shapes_v5", "vlm")
    assert v5.recipe == "shapes-v5" and C.Config.from_json(v5.to_json()).recipe == "shapes-v5"
    assert v6.model == v5.model and v6.train == v5.train and v6.optim == v5.optim and v5.data.relation_turns == 0
    assert replace(v6.data, relation_turns=0) == v5.data
    assert (v5.data.hard_negatives, v5vlm.data.hard_negatives) == (1.0, 1.0)  # v5: confusable "is there" negatives
    v4, v4vlm = preset("shapes_v4", "pixel_rf"), preset("shapes_v4", "vlm")
    assert v4.recipe == "shapes-v4" and C.Config.from_json(v4.to_json()).recipe == "shapes-v4"
    assert v5.model == v4.model and v5.train == v4.train and v5.optim == v4.optim and v4.data.hard_negatives == 0.0
    assert (v4.data.gen_fraction, v4vlm.data.gen_fraction) == (0.8, 0.0)  # v4: 80% generation in the pixel stage
    v3, v2, v1 = preset("shapes_v3", "pixel_rf"), preset("shapes_v2", "vlm"), preset("shapes_v1", "vlm")
    assert v4.model == v3.model and v4.train == v3.train and v4.optim == v3.optim and v3.data.gen_fraction == 0.5
    assert v3.recipe == "shapes-v3" and C.Config.from_json(v3.to_json()).recipe == "shapes-v3"
    m = v3.model
    assert (m.rep_init, m.rep_momentum, m.rep_balance, m.rep_center_momentum, m.pos_init, m.image_rope,
            m.loss_t_eps) == ("kmeans", 1.0, "none", 1.0, "sincos", "2d", 0.3)
    v2rf = preset("shapes_v2", "pixel_rf")
    assert v3.data == v2rf.data and v3.train == v2rf.train and v3.optim == v2rf.optim  # v3 changes the model only
    assert v2.recipe == "shapes-v2" and v1.recipe == "shapes-v1"
    assert (v2.train.encoder_init, v2.train.freeze, v2.data.qa_turns, v2.data.drop_both) == (
        "shapes_encoder", "encoder.", 8, 0.1)
    assert (v1.train.encoder_init, v1.train.freeze, v1.data.qa_turns, v1.data.drop_both) == ("", "", 1, 0.0)
    assert (v1.model.t_mean, v1.model.t_std) == (-0.8, 0.8) and (v2.model.t_mean, v2.model.t_std) == (0.0, 1.0)
    assert C.Config.from_json(v2.to_json()).recipe == "shapes-v2"


def test_pretraining_runs_and_saves_what_loads(tmp_path):
    meta = encoders.pretrain(tmp_path / "e", steps=2, batch_size=4, dim=32, n_layers=1, n_heads=2, progress=False,
                            probe_scenes=(20, 10))
    state, saved = pretrained.world_encoder_state(tmp_path / "e")
    assert saved == meta and set(meta["probe_heldout"]) == {"color", "shape", "color_all", "shape_all"}
    assert all(v.dtype == torch.float32 and np.isfinite(v.numpy()).all() for v in state.values())
