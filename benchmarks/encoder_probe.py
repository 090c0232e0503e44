"""What a shapes-world encoder's patch features say: a fresh linear probe per target (the object's color
and shape under each patch, and the patch's own row and column on the grid), trained on train-stream
scenes and scored on held-out ones (encoders.probe).

    .venv/bin/python benchmarks/encoder_probe.py --encoder shapes_encoder --out docs/results/bench/encoder_probe.jsonl

Row and column measure how much absolute position the features carry: the understanding tokens reach the
backbone with RoPE only, which moves attention scores but puts no position into a token's value, so
whatever says where an object sits in an answer must come from the features themselves (or
model.und_pos). One JSON line per encoder, appended, after the command as a comment line.
"""

from __future__ import annotations

import argparse

import torch
from jsonl_log import emit, start  # benchmarks/ (this script's folder)

from repforce import pretrained
from repforce.encoder import ImageEncoder
from repforce.worlds import encoders


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--encoder", nargs="+", default=["shapes_encoder"], help="shipped encoder names or folders")
    ap.add_argument("--train", type=int, default=1500, help="train-stream scenes for the probe")
    ap.add_argument("--test", type=int, default=500, help="held-out scenes it is scored on")
    ap.add_argument("--out", default="")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start(args.out)
    for name in args.encoder:
        state, meta = pretrained.world_encoder_state(name)
        e = meta["encoder"]
        enc = ImageEncoder(e["image_size"], e["patch"], 3, e["dim"], e["n_layers"], e["n_heads"])
        enc.load_state_dict(state)
        acc = encoders.probe(enc, args.train, args.test, targets=("color", "shape", *encoders.POSITION))
        line = {"bench": "encoder_probe", "encoder": str(name), "version": meta.get("version"),
                "train_scenes": args.train, "heldout_scenes": args.test, **{k: round(v, 3) for k, v in acc.items()}}
        emit(line, args.out)


if __name__ == "__main__":
    main()
