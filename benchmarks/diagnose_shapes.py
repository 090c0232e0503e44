"""Why the shapes preset learns slowly: the candidates of issue 19 that need no training, measured.

    python benchmarks/diagnose_shapes.py [--samples 4000] [--out docs/results/bench/diagnose_shapes.json]

1. What the LM loss is made of: the share of answer tokens (the targets of L_LM) by question kind
   over the vlm stage's training stream, with the tokens per sample.
2. How often each guidance branch is trained: generation samples with text dropped, reps dropped,
   both (the pixel stage's unconditional branch), from the stream itself.
3. Where train-time t lands: the logit-normal's mass above 0.5, 0.7 and 0.9 (t = 1 is data).
4. Prototypes from data init: distinct prototypes of the quantizer after its first training
   batch, with the shapes preset's geometry (K, batch), for a random encoder and for the shipped
   world encoder (assets/shapes_encoder), whose features of background cells differ only slightly.

Prints one JSON object; --out also writes it.
"""

import argparse
import json
import math
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
from scipy.stats import norm

from repforce.config import override
from repforce.data import build_world_tokenizer, make_stream, sample_at
from repforce.model import RFModel
from repforce.presets import preset
from repforce.pretrained import load_world_encoder
from repforce.sequence import CAPTION_QUESTION, Layout


def lm_targets(n: int, tok) -> dict:
    cfg = preset("shapes", "vlm")
    tokens, samples = Counter(), Counter()
    for j in range(n):
        s = sample_at(cfg.data, j)
        kind = "caption" if s.prompt == CAPTION_QUESTION else " ".join(s.prompt.split()[:2])
        tokens[kind] += len(tok.encode(s.answer)) + 1  # the answer and its EOS
        samples[kind] += 1
    total = sum(tokens.values())
    return {k: {"sample_share": round(samples[k] / n, 3), "lm_target_share": round(v / total, 3),
                "tokens_per_sample": round(v / samples[k], 2)} for k, v in tokens.most_common()}


def guidance_branches(n: int) -> dict:
    cfg = preset("shapes", "pixel_rf")
    gen = [s for s in (sample_at(cfg.data, j) for j in range(n)) if s.is_gen]
    text = sum(1 for s in gen if s.prompt == "")
    rep = sum(1 for s in gen if s.drop_rep)
    both = sum(1 for s in gen if s.prompt == "" and s.drop_rep)
    return {"generation_samples": len(gen), "text_dropped": round(text / len(gen), 4),
            "rep_dropped": round(rep / len(gen), 4), "both_dropped (pixel uncond branch)": round(both / len(gen), 4)}


def t_mass() -> dict:
    m = preset("shapes", "pixel_rf").model
    return {f"P(t > {x})": round(float(1 - norm.cdf((math.log(x / (1 - x)) - m.t_mean) / m.t_std)), 4)
            for x in (0.5, 0.7, 0.9)}


def data_init_prototypes(tok, encoder_init: str = "") -> dict:
    cfg = preset("shapes", "pixel_rf")
    torch.manual_seed(0)
    model = RFModel(cfg.model)
    if encoder_init:
        load_world_encoder(model, encoder_init)
    batch = make_stream(override(cfg, []), tok, Layout.for_model(cfg.model)).batch(0, cfg.train.batch_size)
    with torch.no_grad():
        model.train()
        model.rep_targets(batch["images"][batch["is_gen"]])
    protos = model.quantizer.prototypes
    distinct = torch.unique(protos.round(decimals=4), dim=0).shape[0]
    return {"K": protos.shape[0], "features_in_first_batch": int(batch["is_gen"].sum()) * cfg.model.n_rep,
            "distinct_prototypes": distinct}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        tok = build_world_tokenizer(d, n_scenes=500)
        report = {"lm_targets": lm_targets(a.samples, tok), "guidance_branches": guidance_branches(a.samples),
                  "train_t": t_mass(), "data_init_random_encoder": data_init_prototypes(tok)}
        shipped = Path(__file__).resolve().parents[1] / "src/repforce/assets/shapes_encoder"
        if (shipped / "encoder.json").exists():
            report["data_init_world_encoder"] = data_init_prototypes(tok, "shapes_encoder")
    text = json.dumps(report, indent=1)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
