"""repforce's `pixel` variant side by side with transfusion-pytorch (lucidrains), the closest open
implementation of one transformer trained with text AR and flow matching. Prints one JSON
object per line; the last one holds the ratio.

    .venv/bin/pip install -e '.[bench]'          # transfusion-pytorch: a benchmark extra only
    .venv/bin/python benchmarks/peer_transfusion.py --steps 10 --rounds 3

Same process, same width, depth, heads, head size, FFN width, sequence layout (the text of a
shapes-world prompt, then 64 patches of 4x4x3 pixel values) and batch; training steps of both
alternate round by round and the best round of each counts. Both run a full AdamW step on
generation-only batches: text LM loss on the prompt plus the flow-matching loss on the patches.
transfusion's extra velocity-consistency pass is switched off (weight 0) so both do one forward
and one backward. Differences that remain, listed so the ratio reads right: transfusion has no
grouped-query attention (its heads all carry keys and values), gates its attention values,
adds U-Net skips between layers, and builds its masks per sample; repforce runs its MoT routing
with one expert in use per token.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from repforce import config as C
from repforce.data import WorldStream as ShapesStream
from repforce.data import build_world_tokenizer
from repforce.model import RFModel
from repforce.presets import preset
from repforce.runtime import autocast
from repforce.sequence import GEN, Layout
from repforce.trainable import param_groups


def repforce_step(model, opt, batch, precision):
    with autocast(precision, torch.device("cpu")):
        loss = model(batch)["loss"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def to_transfusion(batch: dict, patch_values: int) -> list[list]:
    """repforce's generation batch as transfusion's input: per sample [text ids, (n_patch, values) floats]."""
    out = []
    gen = batch["kind"] == GEN
    for i in range(batch["kind"].shape[0]):
        text = batch["tokens"][i][batch["kind"][i] == 1]
        n = int(gen[i].sum())
        out.append([text.clamp(min=0), torch.randn(n, patch_values)])
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="shapes")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from transfusion_pytorch import Transfusion
    except ImportError:
        raise SystemExit("transfusion-pytorch is not installed: .venv/bin/pip install -e '.[bench]'") from None

    with tempfile.TemporaryDirectory() as d:
        tok = build_world_tokenizer(d)
    cfg = preset(args.preset, "pixel")
    cfg = C.override(cfg, ["train.precision=fp32", f"model.vocab_size={len(tok)}", "data.gen_fraction=1.0",
                           f"train.batch_size={args.batch}"])
    c = cfg.model
    torch.manual_seed(0)
    ours = RFModel(c)
    ours_opt = torch.optim.AdamW(param_groups(ours, cfg), lr=1e-4, betas=(0.9, 0.95))
    stream = ShapesStream(cfg.data, tok, Layout.for_model(c))
    batches = [stream.batch(s, args.batch) for s in range(args.steps)]
    assert all(bool(b["is_gen"].all()) for b in batches), "generation-only batches expected"

    peer = Transfusion(
        num_text_tokens=len(tok), dim_latent=c.patch_values, modality_default_shape=(c.n_gen,),
        velocity_consistency_loss_weight=0.0,
        transformer=dict(dim=c.dim, depth=c.n_layers, dim_head=c.head_dim, heads=c.n_heads,
                         ff_expansion_factor=c.ffn_hidden * 3 / (2 * c.dim), use_flex_attn=False))
    peer_opt = torch.optim.AdamW(peer.parameters(), lr=1e-4, betas=(0.9, 0.95))
    peer_batches = [to_transfusion(b, c.patch_values) for b in batches]

    def peer_step(batch):
        loss = peer(batch)
        peer_opt.zero_grad(set_to_none=True)
        loss.backward()
        peer_opt.step()

    # tokens per step: text + the patches (+ BOI/EOI in repforce, som/eom in transfusion): the same count
    tokens = sum(int((b["kind"] != 0).sum()) for b in batches)
    params = {"repforce": sum(p.numel() for n, p in ours.named_parameters() if not n.startswith("ema_encoder.")),
              "transfusion": sum(p.numel() for p in peer.parameters())}
    print(json.dumps({"what": "peer_setup", "preset": args.preset, "batch": args.batch, "tokens_per_step":
                      tokens / len(batches), "params": params, "threads": torch.get_num_threads()}), flush=True)
    repforce_step(ours, ours_opt, batches[0], "fp32")  # warm up both once
    peer_step(peer_batches[0])
    best = {"repforce": float("inf"), "transfusion": float("inf")}
    for r in range(args.rounds):
        for name in ("repforce", "transfusion"):
            t0 = time.perf_counter()
            for i in range(args.steps):
                if name == "repforce":
                    repforce_step(ours, ours_opt, batches[i], "fp32")
                else:
                    peer_step(peer_batches[i])
            dt = time.perf_counter() - t0
            best[name] = min(best[name], dt)
            print(json.dumps({"what": "peer_round", "round": r, "impl": name, "tokens_per_s": tokens / dt}), flush=True)
    tps = {k: tokens / v for k, v in best.items()}
    print(json.dumps({"what": "peer_ratio", "repforce_tokens_per_s": tps["repforce"],
                      "transfusion_tokens_per_s": tps["transfusion"],
                      "ratio_repforce_over_transfusion": tps["repforce"] / tps["transfusion"]}), flush=True)


if __name__ == "__main__":
    main()
