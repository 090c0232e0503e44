"""The Representation Forcing model: encoder, MoT backbone, heads and losses, one code path for all variants.

One sequence per sample (docs/DESIGN.md section 2), right-padded to L:

    generation     [BOS prompt][BOI][r_1 .. r_M][p_1 .. p_N][EOI] pad
    understanding  [BOS][IMG_START][e_1 .. e_E][IMG_END][question][answer][EOS] pad

`kind` marks each position (PAD, TEXT, ENC, REP, GEN below). Text and rep are causal;
the pixel block and the encoder block are bidirectional inside and see the whole
prefix; padding is invisible. The rep head at the position just before each rep slot
predicts that slot's id; the pixel head maps each pixel slot back to its patch
(x-prediction, flow.py). Variants (`ModelConfig.variant`):

    vlm         understanding only: L_LM; one FFN expert, no generation modules
    pixel       + pixel flow matching: L_LM + L_FM
    pixel_rf    + discrete rep tokens: L_LM + L_Rep + L_FM            (the method)
    vae         as pixel, diffusing frozen-VAE latents (the trainer passes them as gen_x)
    vae_rf      as pixel_rf on VAE latents
    pixel_repa  pixel + REPA: L_LM + L_FM + w * (-cos(proj(h_mid), encoder features))
    pixel_cont  rep slots hold continuous features, regressed by a per-token flow head:
                L_LM + L_Cont + L_FM

Axes: B batch, L length, D backbone width, G generation samples, U understanding
samples, N gen tokens per image, M rep cells, E encoder tokens, De encoder width,
P values per gen patch, K codebook size.
"""

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import flow, packing
from .attention import ATTENTIONS, block_mask, may_attend
from .backbone import KVCache, RoutedFFN, Transformer
from .config import Config, ModelConfig
from .encoder import Connector, build_encoder, ema_update, patchify, unpatchify
from .positions import crop_grid, grid_sincos, image_rope_positions
from .quantizer import FeatureCenter, OnlineQuantizer, pool2x2
from .sequence import ENC, GEN, PAD, REP

KIND_TO_EXPERT = (-1, 0, 0, 1, 2)  # pad -> no FFN (backbone.py); text, encoder -> understanding; rep -> 1; gen -> 2


def attention_mask(q_kind: torch.Tensor, q_pos: torch.Tensor, k_kind: torch.Tensor | None = None,
                   k_pos: torch.Tensor | None = None, doc: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean attention mask (B, 1, Lq, Lk), True = may attend, from kinds and positions.

    A query sees a key if the key is not padding and either comes no later (causal)
    or both are ENC or both are GEN (the image blocks are bidirectional; each sample
    holds one image, so one block per kind): attention.may_attend. Keys default to the
    queries (a full forward); with a KVCache they are the cached prefix followed by the
    queries. doc (B, L): packed rows' sample of each position; a query then sees its own only.
    """
    if k_kind is None:
        k_kind, k_pos = q_kind, q_pos
    qk, qp = q_kind[:, :, None], q_pos[:, :, None]  # (B, Lq, 1)
    kk, kp = k_kind[:, None, :], k_pos[:, None, :]  # (B, 1, Lk)
    qd, kd = (None, None) if doc is None else (doc[:, :, None], doc[:, None, :])
    allowed = may_attend(qk, qp, qd, kk, kp, kd)  # (B, Lq, Lk)
    # a padding query with no visible key (left padding) looks at all keys: keeps SDPA finite, output unused
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return allowed[:, None]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features (B, dim) of t in [0, 1], scaled by 1000 so the frequencies match DiT's integer steps."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs  # (B, dim/2)
    return torch.cat([args.cos(), args.sin()], dim=-1)


class TimestepEmbedder(nn.Module):
    """DiT's timestep embedding: sinusoid then a SiLU MLP."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):  # (B,) -> (B, dim)
        return self.mlp(timestep_embedding(t, self.freq_dim))


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, d_out))


class ContFlowHead(nn.Module):
    """pixel_cont: a per-token MLP flow head (MAR-style) predicting a clean rep feature.

    Input: the noisy feature z_t, t, and the backbone hidden c at the position before
    the rep slot; output: x_pred of the feature. Conditioning is additive.
    """

    def __init__(self, feat_dim: int, cond_dim: int, width: int, depth: int):
        super().__init__()
        self.in_proj = nn.Linear(feat_dim, width)
        self.cond_proj = nn.Linear(cond_dim, width)
        self.t_embed = TimestepEmbedder(width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), mlp(width, 2 * width, width)) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, feat_dim)

    def forward(self, z, t, c):  # (n, De), (n,), (n, D) -> (n, De)
        x = self.in_proj(z) + self.cond_proj(c) + self.t_embed(t)
        for block in self.blocks:
            x = x + block(x)
        return self.out(self.norm(x))


class RFModel(nn.Module):
    """Encoder + connector + MoT backbone + heads. `forward(batch)` returns the losses; the
    `embed_*`, head and `forward_hidden` methods are what an inference engine composes."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D, De = cfg.dim, cfg.enc_dim
        self.backbone = Transformer(cfg.vocab_size, D, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                                    cfg.ffn_hidden, cfg.n_experts, cfg.norm_eps, cfg.rope_theta,
                                    cfg.moe_experts, cfg.moe_top_k, cfg.moe_norm_topk)
        self.lm_head = nn.Linear(D, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.backbone.embed_tokens.weight
        self.encoder = build_encoder(cfg)
        self.connector = Connector(De, D)
        if cfg.und_pos != "none":  # learned absolute position of the understanding image's encoder tokens
            self.und_pos = nn.Parameter(torch.zeros((cfg.image_size // cfg.enc_patch) ** 2, D))
        if cfg.needs_ema_encoder:
            self.ema_encoder = copy.deepcopy(self.encoder).requires_grad_(False)  # updated by update_ema_encoder()
            if cfg.rep_center:
                self.feat_center = FeatureCenter(cfg.enc_dim, cfg.rep_center_momentum)
        if cfg.has_gen:  # "gen" = pixels or VAE latents: the model only sees gen_x
            self.gen_embed = nn.Linear(cfg.patch_values, D)
            self.gen_pos = nn.Parameter(torch.zeros(cfg.n_gen, D))  # learned 2D position, one row per patch
            self.t_embed = TimestepEmbedder(D)
            h = cfg.gen_head_hidden
            self.gen_head = mlp(D, h, cfg.patch_values) if h else nn.Linear(D, cfg.patch_values)
        if cfg.rep_slots:
            self.rep_pos = nn.Parameter(torch.zeros(cfg.n_rep, D))  # learned 2D position, one row per cell
            self.null_rep = nn.Parameter(torch.zeros(D))  # input at every rep slot of a rep-dropped sample
        if cfg.rep_ids:
            self.quantizer = OnlineQuantizer(cfg.codebook_size, De, cfg.rep_temperature, cfg.rep_momentum,
                                             cfg.rep_balance, cfg.rep_sinkhorn_iters, cfg.rep_dead_after,
                                             stats=cfg.rep_balance_stats, init=cfg.rep_init)
            self.rep_embed = nn.Embedding(cfg.codebook_size, D)  # own table, apart from the text vocabulary
            self.rep_head = nn.Linear(D, cfg.codebook_size, bias=False)
        if cfg.variant == "pixel_cont":
            self.cont_in = nn.Linear(De, D)
            self.cont_head = ContFlowHead(De, D, cfg.cont_width, cfg.cont_depth)
        if cfg.variant == "pixel_repa":
            self.repa_proj = mlp(D, 2 * D, De)
        self.uniform = False  # set_uniform(): every module runs on every batch (sharded runs)
        self.attention = "sdpa"  # set_attention(): "flex" for FlexAttention in full forwards (attention.py)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02):
        """Backbone as Qwen3, encoder as ViT; the rest normal(0.02). Output heads start at zero
        (DiT, nanochat): CE losses start at log(vocab), the pixel head predicts x = 0. The EMA
        encoder starts as a copy of the encoder, the prototypes as random unit vectors."""
        self.backbone.init_weights(std)
        self.encoder.init_weights(std)
        self.connector.init_weights(std)
        own = ("backbone.", "encoder.", "ema_encoder.", "connector.")
        for name, m in self.named_modules():
            if name.startswith(own):
                continue
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for name in ("gen_pos", "rep_pos", "null_rep"):
            if hasattr(self, name):
                nn.init.normal_(getattr(self, name), std=std)
        if hasattr(self, "und_pos"):  # the scale of the connector's output is about 4 in a trained vlm
            side = self.cfg.image_size // self.cfg.enc_patch
            self.und_pos.copy_(grid_sincos(self.cfg.dim, side, side, scale=1.0))
        if self.cfg.pos_init == "sincos":
            c, side = self.cfg, self.cfg.gen_size // self.cfg.gen_patch
            if hasattr(self, "gen_pos"):
                self.gen_pos.copy_(grid_sincos(c.dim, side, side))
            if hasattr(self, "rep_pos"):
                self.rep_pos.copy_(grid_sincos(c.dim, side, c.image_size // c.enc_patch // c.rep_pool))
        heads = [getattr(self, n, None) for n in ("rep_head", "gen_head")]
        heads += [self.cont_head.out] if hasattr(self, "cont_head") else []
        heads += [] if self.cfg.tie_embeddings else [self.lm_head]
        for head in heads:
            if head is not None:
                last = head[-1] if isinstance(head, nn.Sequential) else head
                nn.init.zeros_(last.weight)
                if last.bias is not None:
                    nn.init.zeros_(last.bias)
        if hasattr(self, "ema_encoder"):  # by position: names may differ by wrappers (activation checkpointing)
            for e, p in zip(self.ema_encoder.parameters(), self.encoder.parameters()):
                e.copy_(p)
        if hasattr(self, "quantizer"):
            self.quantizer.reset()

    def set_uniform(self, on: bool = True) -> None:
        """Run every module on every batch, on empty slices if need be, so each rank issues the same
        collectives and every parameter gets a (zero) gradient, which FSDP's reduce-scatter needs
        (parallelize.shard calls this)."""
        self.uniform = on
        for m in self.backbone.modules():
            if isinstance(m, RoutedFFN):
                m.uniform = on

    def set_attention(self, kind: str) -> None:
        """"sdpa" (dense boolean mask, the reference) or "flex" (FlexAttention on a BlockMask of the same
        rule; GPU, compiled) for full forwards; KV-cached steps always use SDPA (train.attention)."""
        if kind not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {kind!r}")
        self.attention = kind

    # ------------------------------------------------------------ inputs of each kind of position

    def embed_text(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, D)
        return self.backbone.embed_tokens(tokens)

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """Understanding input: (B, C, H, W) -> connector(normed encoder features) (B, E, D), plus und_pos (the
        top-left of its grid for a smaller image) where the model has one."""
        x = self.connector(self.encoder(images)[1])
        if hasattr(self, "und_pos"):
            x = x + crop_grid(self.und_pos, math.isqrt(x.shape[1])).to(x.dtype)
        return x

    def embed_rep(self, values: torch.Tensor, start: int = 0, drop: torch.Tensor | None = None,
                  cells: int | None = None) -> torch.Tensor:
        """Rep slot inputs for cells [start, start + m): ids (B, m) long, or continuous features
        (B, m, De) for pixel_cont; rows with drop (B,) True get the null embedding. -> (B, m, D).
        cells: rep cells per side of a smaller image (packing.py): the top-left of rep_pos."""
        m = values.shape[1]
        x = self.rep_embed(values) if values.dtype == torch.long else self.cont_in(values)  # (B, m, D)
        if drop is not None:
            x = torch.where(drop[:, None, None], self.null_rep.to(x.dtype), x)
        pos = self.rep_pos if cells is None else crop_grid(self.rep_pos, cells)
        return x + pos[start:start + m].to(x.dtype)

    def embed_gen(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Gen slot inputs: noisy z_t (B, C, Hg, Wg) at time t (B,) -> (B, N, D); a smaller square
        z (packing.py) takes the top-left of gen_pos."""
        x = self.gen_embed(patchify(z, self.cfg.gen_patch))  # (B, N, D)
        pos = crop_grid(self.gen_pos, z.shape[-1] // self.cfg.gen_patch)  # (N, D), all of it at full size
        return x + pos.to(x.dtype) + self.t_embed(t)[:, None].to(x.dtype)

    # ------------------------------------------------------------ heads

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., vocab)
        return self.lm_head(h)

    def rep_logits(self, h: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., K)
        return self.rep_head(h)

    def gen_pred(self, h: torch.Tensor) -> torch.Tensor:
        """x-prediction from the hidden states of the N gen slots: (B, N, D) -> (B, C, Hg, Wg)."""
        c = self.cfg
        return unpatchify(self.gen_head(h), c.gen_patch, c.gen_channels, c.gen_size, c.gen_size)

    def cont_pred(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """pixel_cont: x-prediction of rep features (n, De) from z_t (n, De), t (n,), hidden before the slot (n, D)."""
        return self.cont_head(z, t, cond)

    # ------------------------------------------------------------ backbone

    def expert_ids(self, kind: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, L)
        ids = torch.tensor(KIND_TO_EXPERT, device=kind.device)[kind]
        return ids.clamp(max=self.cfg.n_experts - 1)  # vlm: a single expert

    def new_kv_cache(self, batch: int, max_len: int, device=None) -> KVCache:
        return self.backbone.new_kv_cache(batch, max_len, device)

    def forward_hidden(self, h: torch.Tensor, kind: torch.Tensor, positions: torch.Tensor,
                       kv_cache: KVCache | None = None, commit: bool = True, return_layer: int | None = None,
                       image_start: torch.Tensor | None = None, doc: torch.Tensor | None = None):
        """Backbone over input embeddings h (B, L, D) of the given kinds and positions (B, L).
        image_start: with image_rope="2d", the 1D position of the image's first slot when this chunk
        starts inside the image (image_rope_positions); positions stay 1D for the mask and the cache.
        doc (B, L): packed rows (packing.py), the sample of each position; attention stays inside it.

        With a kv_cache the queries attend to its prefix and themselves; commit=False is
        the frozen-prefix use (the pixel block at each ODE step). Without one, attention="flex"
        (set_attention) runs FlexAttention on a BlockMask instead of SDPA on a dense mask.
        Returns the final hidden (B, L, D), or (final, after layers[return_layer]).
        """
        if kv_cache is not None:
            if doc is not None:
                raise ValueError("a KVCache holds unpacked rows: doc must be None")
            mask = attention_mask(kind, positions, *kv_cache.keys_meta(kind, positions))
        elif self.attention == "flex":
            mask = block_mask(kind, positions, doc)
        else:
            mask = attention_mask(kind, positions, doc=doc)
        if self.cfg.image_rope != "2d":
            rope = positions
        elif doc is not None:
            rope = packing.rope_positions(kind, positions, doc, self.cfg)
        else:
            rope = image_rope_positions(kind, positions, self.cfg, image_start)
        out = self.backbone(h, self.expert_ids(kind), mask, rope, kv_cache, return_layer)
        if kv_cache is not None and commit:
            kv_cache.commit(kind, positions)
        return out

    # ------------------------------------------------------------ targets

    @torch.no_grad()
    def ema_features(self, images: torch.Tensor) -> torch.Tensor:
        """EMA encoder's last-layer patch features before the final norm, (B, E, De)."""
        return self.ema_encoder(images)[0]

    @torch.no_grad()
    def target_features(self, images: torch.Tensor) -> torch.Tensor:
        """What every representation target is made of: EMA features, centered (FeatureCenter), (B, E, De)."""
        f = self.ema_features(images)
        return self.feat_center(f) if hasattr(self, "feat_center") else f

    @torch.no_grad()
    def rep_targets(self, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Rep ids (B, M) of images and codebook stats; prototypes move only in training mode."""
        return self.quantizer(pool2x2(self.target_features(images), self.cfg.rep_pool))

    @torch.no_grad()
    def cont_targets(self, images: torch.Tensor) -> torch.Tensor:
        """pixel_cont targets (B, M, De): pooled target features, L2-normalized and scaled to unit RMS per channel."""
        return self._cont(self.target_features(images))

    def _cont(self, feats: torch.Tensor) -> torch.Tensor:  # (B, E, De) target features -> (B, M, De) cont targets
        y = pool2x2(feats, self.cfg.rep_pool).float()
        return F.normalize(y, dim=-1) * math.sqrt(y.shape[-1])

    @torch.no_grad()
    def update_ema_encoder(self, decay: float | None = None) -> None:
        """ema_encoder <- EMA of encoder; call after each optimizer step."""
        decay = self.cfg.encoder_ema if decay is None else decay
        if hasattr(self, "ema_encoder") and decay < 1:  # 1.0: frozen targets, nothing to do
            ema_update(self.ema_encoder, self.encoder, decay)

    @torch.no_grad()
    def group_features(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """target_features of images of several sizes (one (n, C, s, s) tensor per size): the feature
        centre takes one statistic over all of them, as over one batch."""
        if len(images) == 1:
            return [self.target_features(images[0])]
        feats = [self.ema_features(x) for x in images]  # (n, E_s, De) each
        if not hasattr(self, "feat_center"):
            return feats
        flat = self.feat_center(torch.cat([f.reshape(-1, f.shape[-1]) for f in feats]))  # (sum n E_s, De)
        return [c.view(f.shape) for c, f in zip(flat.split([f.shape[0] * f.shape[1] for f in feats]), feats)]

    @torch.no_grad()
    def group_rep_targets(self, images: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
        """rep_targets of images of several sizes: ids (n, M_s) per size, balanced and counted as one batch."""
        if len(images) == 1:
            ids, stats = self.rep_targets(images[0])
            return [ids], stats
        pooled = [pool2x2(f, self.cfg.rep_pool) for f in self.group_features(images)]  # (n, M_s, De) each
        ids, stats = self.quantizer(torch.cat([p.reshape(-1, p.shape[-1]) for p in pooled]))  # (sum n M_s,)
        ids = ids.split([p.shape[0] * p.shape[1] for p in pooled])
        return [i.view(p.shape[:2]) for i, p in zip(ids, pooled)], stats

    # ------------------------------------------------------------ training forward

    def build_inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """Input embeddings (B, L, D) of a batch (contract: sequence.py, packed rows: packing.py) and
        what the losses need.

        Draws the flow noise and times of the generation samples and, for the rep
        variants, computes the rep targets (moving the prototypes in training mode).
        With images of several sizes (packed batch["image_side"]) the encoder, the noise and
        the gen and rep inputs run per size (one `_Gen` group each), filled back in sample order.
        """
        cfg = self.cfg
        kind, is_gen = batch["kind"], batch["is_gen"]
        B, L = kind.shape
        positions = batch.get("positions")
        if positions is None:
            positions = torch.arange(L, device=kind.device).expand(B, L)
        if is_gen.any() and not cfg.has_gen:
            raise ValueError("the vlm variant trains on understanding samples only; the batch has generation samples")
        side = batch.get("image_side")  # (S,) each sample's image side; None: all at full size
        doc = batch.get("doc")  # packed rows: the sample of each position
        if doc is None and side is not None:  # unpacked rows of smaller images: each row its own document
            doc = torch.where(kind != PAD, torch.arange(B, device=kind.device)[:, None], -1)  # (B, L)
        aux: dict = {"positions": positions, "doc": doc, "stats": {}, "groups": []}

        h = self.embed_text(batch["tokens"])  # (B, L, D); slots of other kinds are overwritten below
        und = ~is_gen
        enc = None
        if bool(und.any()) or self.uniform:
            enc = packing.by_sample([(i, self.embed_image(packing.crop(batch["images"][i], s)))
                                     for i, s in packing.size_groups(side, und)])  # (U, E, D)
        h = _fill(h, kind == ENC, enc, "ENC")
        gen_x = batch.get("gen_x", batch["images"])
        G = aux["G"] = int(is_gen.sum())
        rep_inputs = None
        if G or (self.uniform and cfg.has_gen):
            groups = aux["groups"]
            for i, s in packing.size_groups(side, is_gen):
                x = packing.crop(gen_x[i], s).float() if len(i) else \
                    gen_x.new_zeros(0, cfg.gen_channels, cfg.gen_size, cfg.gen_size).float()  # (n, C, Hg, Wg)
                if "noise_seed" in batch:  # per-sample noise and time: the same whatever the batch split across ranks
                    e, t = _sample_noise(batch["noise_seed"][i], x, cfg)
                else:
                    e = torch.randn_like(x)
                    t = flow.sample_t(len(i), cfg.t_mean, cfg.t_std, device=x.device)  # (n,)
                images = packing.crop(batch["images"][i], s) if cfg.needs_ema_encoder else None
                groups.append(_Gen(i, s, (x.shape[-1] // cfg.gen_patch) ** 2, x, e, t, batch["drop_rep"][i], images))
            h = _fill(h, kind == GEN, packing.by_sample(
                [(g.idx, self.embed_gen(flow.interpolate(g.x, g.e, g.t), g.t)) for g in groups]), "GEN")  # (G, N, D)
            if cfg.rep_slots:
                if cfg.rep_ids:
                    values, aux["stats"] = self.group_rep_targets([g.images for g in groups])  # (n, M_s) each
                else:  # pixel_cont: continuous targets (cont_targets)
                    values = [self._cont(f) for f in self.group_features([g.images for g in groups])]  # (n, M_s, De)
                rep_inputs = packing.by_sample([(g.idx, self.embed_rep(
                    v if cfg.rep_ids else v.to(h.dtype), drop=g.drop, cells=math.isqrt(v.shape[1])))
                    for g, v in zip(groups, values)])  # (G, M, D)
                # the targets of the rep samples that are not dropped, in sample then cell order
                aux["rep_target"] = packing.by_sample([(g.idx[~g.drop], v[~g.drop]) for g, v in zip(groups, values)])
        else:
            _fill(h, kind == GEN, None, "GEN")  # checks there are none
        h = _fill(h, kind == REP, rep_inputs, "REP")
        return h, aux

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Losses of one batch. Returns scalar tensors: loss (the sum that is trained), loss_lm,
        and per variant loss_rep and rep_acc, loss_fm, loss_repa, loss_cont, plus codebook stats rep_*."""
        cfg = self.cfg
        kind, text_targets, is_gen = batch["kind"], batch["text_targets"], batch["is_gen"]
        h, aux = self.build_inputs(batch)
        G, groups, doc = aux["G"], aux["groups"], aux["doc"]
        out: dict[str, torch.Tensor] = dict(aux["stats"])
        repa = cfg.variant == "pixel_repa"
        hidden = self.forward_hidden(h, kind, aux["positions"], return_layer=cfg.repa_layer if repa else None, doc=doc)
        if repa:
            hidden, mid = hidden
        zero = hidden.new_zeros(())  # a term with no carrier in this batch
        # Each term is a mean over its items (text targets, rep tokens, gen samples). With batch["norm_*"]
        # (data.local_batch) the divisor is the item count over all ranks / world size, so the
        # gradients FSDP averages over ranks are those of the mean over the global batch.
        norm = {k: batch.get(f"norm_{k}") for k in ("lm", "rep", "gen")}

        def mean(total, n, key):  # total: sum over n local items
            if norm[key] is not None:
                return total / norm[key].clamp(min=1e-9)
            return total / n if n else zero

        # L_LM: next-token CE wherever a text target exists
        sel = text_targets != -100
        logits = self.lm_logits(hidden[sel])  # (n, vocab)
        if norm["lm"] is None:
            out["loss_lm"] = F.cross_entropy(logits.float(), text_targets[sel]) if sel.any() else zero
        else:
            out["loss_lm"] = mean(F.cross_entropy(logits.float(), text_targets[sel], reduction="sum"), 0, "lm")
        sizes = [(g.idx, g.n) for g in groups]  # gen tokens per sample of each size group
        if cfg.has_gen:
            out["loss_fm"] = zero
            if G or self.uniform:
                x_pred = self.gen_head(hidden[kind == GEN])  # (G*N, P), samples in order
                fm = []  # per size group: the mean over its samples of their mean over values
                for g, pred in zip(groups, packing.split_by_sample(x_pred, sizes)):
                    xp = patchify(g.x, cfg.gen_patch)  # (n, N, P)
                    ep = patchify(g.e, cfg.gen_patch)  # (n, N, P)
                    if not G:
                        fm.append(0 * x_pred.sum())
                    elif cfg.loss_t_eps:
                        fm.append(flow.fm_loss_capped(pred.view_as(xp), xp, g.t, cfg.loss_t_eps))
                    else:
                        fm.append(flow.fm_loss(pred.view_as(xp), xp, ep, g.t, cfg.t_eps))
                fm_mean = fm[0] if len(fm) == 1 else sum(f * len(g.idx) for f, g in zip(fm, groups)) / G
                out["loss_fm"] = fm_mean if norm["gen"] is None else mean(fm_mean * G, G, "gen")
        if cfg.rep_slots:
            # the position just before each rep slot predicts it (BOI for the first); not in rep-dropped samples
            before = torch.zeros_like(kind, dtype=torch.bool)
            before[:, :-1] = kind[:, 1:] == REP
            keep = is_gen & ~batch["drop_rep"]  # (S,)
            cond = hidden[before & packing.at_positions(keep, doc)]  # (n, D), n = kept samples * M: sample, cell order
        if cfg.rep_ids:
            out["loss_rep"] = zero
            if cond.shape[0] or self.uniform:
                target = aux["rep_target"].reshape(-1)  # (n,)
                rep_logits = self.rep_logits(cond).float()  # (n, K)
                out["loss_rep"] = mean(F.cross_entropy(rep_logits, target, reduction="sum"), cond.shape[0], "rep")
                if cond.shape[0]:
                    out["rep_acc"] = (rep_logits.argmax(-1) == target).float().mean().detach()
        if cfg.variant == "pixel_cont":
            out["loss_cont"] = zero
            if cond.shape[0] or self.uniform:
                y = aux["rep_target"].reshape(-1, cfg.enc_dim)  # (n, De)
                e = torch.randn_like(y)
                t = flow.sample_t(y.shape[0], cfg.t_mean, cfg.t_std, device=y.device)  # one t per token
                y_pred = self.cont_pred(flow.interpolate(y, e, t), t, cond)
                n = y.shape[0]
                cont = flow.fm_loss(y_pred, y, e, t, cfg.t_eps) if n else 0 * y_pred.sum()
                out["loss_cont"] = mean(cont * n, n, "rep") if n else cont
        if repa:
            out["loss_repa"] = zero
            if G or self.uniform:
                neg_cos = []  # per size group: minus the cosines (n * N,)
                feats = self.group_features([g.images for g in groups])  # (n, E, De) each, before the final norm
                for g, target, m in zip(groups, feats, packing.split_by_sample(mid[kind == GEN], sizes)):
                    side = math.isqrt(g.n)
                    if target.shape[1] != g.n:  # align the encoder grid to the gen grid
                        enc_side = math.isqrt(target.shape[1])
                        grid = target.transpose(1, 2).reshape(len(g.idx), -1, enc_side, enc_side)  # (n, De, s, s)
                        target = F.adaptive_avg_pool2d(grid, side).flatten(2).transpose(1, 2)  # (n, N, De)
                    pred = self.repa_proj(m.reshape(-1, m.shape[-1]))  # (n*N, De)
                    target = target.reshape(-1, target.shape[-1])  # (n*N, De)
                    neg_cos.append(-F.cosine_similarity(pred.float(), target.float(), dim=-1))
                if norm["gen"] is not None:  # a mean over samples of their mean over their gen tokens
                    out["loss_repa"] = mean(sum(c.sum() / max(1, g.n) for c, g in zip(neg_cos, groups)), G, "gen")
                elif len(groups) == 1:
                    out["loss_repa"] = neg_cos[0].mean() if G else 0 * pred.sum()
                else:
                    out["loss_repa"] = sum(c.mean() * len(g.idx) for c, g in zip(neg_cos, groups)) / G

        terms = [out[k] for k in ("loss_lm", "loss_rep", "loss_fm", "loss_cont") if k in out]
        if repa:
            terms.append(cfg.repa_weight * out["loss_repa"])
        out["loss"] = sum(terms)
        return out


@dataclass
class _Gen:
    """The generation samples of one image size in a batch (all of them in an unpacked batch)."""

    idx: torch.Tensor  # (n,) their indices among the batch's samples, increasing
    side: int | None  # image side in pixels; None: the full size
    n: int  # gen tokens per sample
    x: torch.Tensor  # (n, C, Hg, Wg) clean gen_x, fp32
    e: torch.Tensor  # (n, C, Hg, Wg) flow noise
    t: torch.Tensor  # (n,) flow times
    drop: torch.Tensor  # (n,) rep sequence dropped
    images: torch.Tensor | None  # (n, C, H, W) images for the EMA encoder's targets


def _sample_noise(seeds: torch.Tensor, x: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow noise e (G, ...) like x and times t (G,), sample i drawn from its own generator seeded by seeds[i]."""
    gen = torch.Generator(device=x.device)
    es, ts = [], []
    for s in seeds.tolist():
        gen.manual_seed(int(s))
        ts.append(flow.sample_t(1, cfg.t_mean, cfg.t_std, device=x.device, generator=gen))
        es.append(torch.randn(x.shape[1:], device=x.device, generator=gen))
    if not es:
        return torch.zeros_like(x), x.new_zeros(0)
    return torch.stack(es), torch.cat(ts)


def _fill(h: torch.Tensor, mask: torch.Tensor, values: torch.Tensor | None, what: str) -> torch.Tensor:
    """h with the positions of mask (B, L) replaced, in raster order, by values (n, m, D); None = expect none."""
    count, made = int(mask.sum()), 0 if values is None else values.shape[0] * values.shape[1]
    if count != made:
        raise ValueError(f"batch has {count} {what} slots, the model built {made} inputs for them")
    return h if values is None else h.masked_scatter(mask[..., None], values.to(h.dtype))


# ----------------------------------------------------------------------------- parameter counts


def count_params(cfg: ModelConfig | Config) -> dict[str, int]:
    """Parameter counts of a model built on the meta device (no memory):

    total      every parameter, the EMA encoder included
    no_ema     total minus the EMA encoder (a copy updated by EMA, never by the optimizer)
    backbone   the MoT transformer (embeddings included); encoder: the image encoder
    active     the backbone parameters one token uses, counted as Qwen3 counts "activated"
               parameters (embedding and LM head whole): per layer attention, norms and one
               MoT expert, which for MoE is its router and top_k of its routed experts
    """
    m = cfg.model if isinstance(cfg, Config) else cfg
    with torch.device("meta"):
        model = RFModel(m)
    n = {name: p.numel() for name, p in model.named_parameters()}
    total = sum(n.values())
    ema = sum(v for k, v in n.items() if k.startswith("ema_encoder."))
    backbone = sum(v for k, v in n.items() if k.startswith("backbone."))
    ffn = sum(v for k, v in n.items() if k.startswith("backbone.") and ".mlp.experts." in k)
    per_expert = ffn // m.n_experts  # one MoT expert over all layers
    if m.moe_experts:
        router = m.n_layers * m.moe_experts * m.dim
        per_expert = router + (per_expert - router) * m.moe_top_k // m.moe_experts
    head = 0 if m.tie_embeddings else n.get("lm_head.weight", 0)
    active = backbone - ffn + per_expert + head
    return {"total": total, "no_ema": total - ema, "backbone": backbone, "encoder": sum(
        v for k, v in n.items() if k.startswith("encoder.")), "active": active}
