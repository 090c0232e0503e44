"""Image encoder, connector, patchify, EMA.  Run: pytest tests/test_encoder.py"""

import copy

import torch
import torch.nn.functional as F

from repforce.encoder import Connector, ImageEncoder, ema_update, patchify, unpatchify


def test_patchify_round_trip_and_layout():
    x = torch.randn(2, 3, 16, 12)
    p = patchify(x, 4)
    assert p.shape == (2, 12, 48)
    assert torch.equal(unpatchify(p, 4, 3, 16, 12), x)
    # patch 1 (row 0, col 1) holds pixels [0:4, 4:8], values ordered (py, px, c)
    assert torch.equal(p[:, 1].view(2, 4, 4, 3), x[:, :, 0:4, 4:8].permute(0, 2, 3, 1))


def test_encoder_outputs_prenorm_and_normed_features():
    torch.manual_seed(0)
    enc = ImageEncoder(image_size=16, patch=4, dim=32, n_layers=2, n_heads=2)
    enc.init_weights()
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    feats, normed = enc(img)
    assert feats.shape == normed.shape == (2, 16, 32)
    assert torch.allclose(normed, enc.norm(feats))
    assert not torch.allclose(feats, normed)
    # bidirectional: the last patch changes the first token
    img2 = img.clone()
    img2[:, :, -4:, -4:] += 1
    assert not torch.allclose(enc(img2)[0][:, 0], feats[:, 0])
    assert Connector(32, 48)(normed).shape == (2, 16, 48)


def test_encoder_conv_equivalence():
    """The linear patch embedding is a stride-p convolution."""
    torch.manual_seed(0)
    enc = ImageEncoder(image_size=8, patch=4, dim=8, n_layers=0, n_heads=1)
    img = torch.randn(1, 3, 8, 8)
    w = enc.patch_embed.weight.view(8, 4, 4, 3).permute(0, 3, 1, 2)  # (D, C, p, p)
    conv = F.conv2d(img, w, enc.patch_embed.bias, stride=4).flatten(2).transpose(1, 2)
    assert torch.allclose(enc(img)[0] - enc.pos_embed, conv, atol=1e-5)


def test_ema_update_math():
    src = torch.nn.Linear(3, 2)
    tgt = copy.deepcopy(src)
    before = tgt.weight.detach().clone()
    with torch.no_grad():
        src.weight.add_(1.0)
    ema_update(tgt, src, decay=0.9)
    assert torch.allclose(tgt.weight, 0.9 * before + 0.1 * src.weight)
