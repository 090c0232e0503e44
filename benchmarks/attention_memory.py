"""Peak memory of one attention forward over a packed row: the dense boolean mask + SDPA (the reference
path) against the BlockMask + FlexAttention (train.attention=flex), at L = 8k and 32k, on the CPU.

    .venv/bin/python benchmarks/attention_memory.py                       # L = 8192 and 32768
    .venv/bin/python benchmarks/attention_memory.py --lengths 8192 --out docs/results/bench/attention_memory.jsonl

The row is what train.tokens_per_rank packs at scale: samples of a 256 px pixel_rf model (patch 16,
rep cells of 2 x 2 patches; prompts and answers of 8 to 80 tokens; half generation, half
understanding), image sides drawn from 128, 192, 256 px (packing.py), first-fit into rows of L.
Each (path, L) runs in a fresh process with q, k, v (1 row, 4 query heads, 2 kv heads, head dim
64, fp32, one thread) and the row's layout already in memory; measured there:

    peak_mib     the process's peak resident memory (VmHWM, reset just before) while the mask is built
                 and one forward runs, minus its resident memory just before: what the step adds
    mask_mib     the bytes of the mask itself: L^2 booleans, or the BlockMask's block tables
    seconds      wall time of mask + forward (FlexAttention after its compile, reported apart)

FlexAttention runs compiled (torch.compile, inductor's CPU template: fused, forward only on CPU);
its eager form would compute the full score matrix. The output of each path is saved and the
parent reports the largest difference between them over the row's real positions. A (path, L)
that does not fit is reported as such. Prints one JSON line; --out appends it to a file too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 64


def rss(key: str) -> int:
    """VmRSS / VmHWM of this process in bytes."""
    return int(re.search(rf"{key}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024


def layout(L: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """kind, positions, doc (1, L) of the first packed row of L tokens."""
    from repforce import packing
    from repforce.config import ModelConfig
    from repforce.sequence import ENC, GEN, PAD, REP, TEXT

    m = ModelConfig(variant="pixel_rf", image_size=256, gen_size=256, gen_patch=16, enc_patch=16, rep_pool=2)
    g = torch.Generator().manual_seed(seed)
    rows, sides = [], []
    n = 3 * L // 200 + 8  # more samples than one row holds
    for i in range(n):
        side = (128, 192, 256)[int(torch.randint(3, (1,), generator=g))]
        slots, text = packing.slots_at(m, side), int(torch.randint(8, 81, (1,), generator=g))
        if i % 2:
            kinds = [TEXT] * (text + 2) + [REP] * slots[REP] + [GEN] * slots[GEN] + [TEXT]
        else:
            kinds = [TEXT, TEXT] + [ENC] * slots[ENC] + [TEXT] * (text + 1)
        rows.append(kinds)
        sides.append(side)
    width = max(len(r) for r in rows)
    kind = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    batch = {"tokens": torch.zeros_like(kind), "kind": kind, "text_targets": torch.full_like(kind, -100),
             "images": torch.zeros(n, 3, 1, 1), "is_gen": torch.tensor([bool(i % 2) for i in range(n)]),
             "drop_rep": torch.zeros(n, dtype=torch.bool)}
    # rows are built at their own sizes already: pack them as they are (images play no part here)
    packed = packing.pack_batch(batch, m, L)
    return {k: packed[k][:1] for k in ("kind", "positions", "doc")}


def measure(path: str, L: int, layout_file: str, out_file: str) -> dict:
    """One (path, L) in this process: the figures of the module docstring."""
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import flex_attention

    from repforce import attention
    from repforce.model import attention_mask

    torch.set_num_threads(1)
    lay = torch.load(layout_file)
    kind, pos, doc = lay["kind"], lay["positions"], lay["doc"]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, HEADS, L, HEAD_DIM, generator=g)
    k, v = (torch.randn(1, KV_HEADS, L, HEAD_DIM, generator=g) for _ in range(2))
    row: dict = {}
    if path == "flex":
        flex = torch.compile(flex_attention, dynamic=False)
        t0 = time.perf_counter()
        with torch.no_grad():  # compile on this shape first: its own memory is not the attention's
            flex(q, k, v, block_mask=attention.block_mask(kind, pos, doc), enable_gqa=True)
        row["compile_s"] = round(time.perf_counter() - t0, 1)
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current resident size
    before, t0 = rss("VmRSS"), time.perf_counter()
    with torch.no_grad():
        if path == "dense":
            mask = attention_mask(kind, pos, doc=doc)  # (1, 1, L, L) bool
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            mask_bytes = mask.numel() * mask.element_size()
        else:
            bm = attention.block_mask(kind, pos, doc)
            y = flex(q, k, v, block_mask=bm, enable_gqa=True)
            mask_bytes = sum(t.numel() * t.element_size() for t in bm.as_tuple() if isinstance(t, torch.Tensor))
            row["blocks_skipped"] = round(1 - float(bm.to_dense().float().mean()), 4)
    row.update(seconds=round(time.perf_counter() - t0, 2), peak_mib=round((rss("VmHWM") - before) / 2**20, 1),
               mask_mib=round(mask_bytes / 2**20, 3))
    torch.save(y[0, :, (kind[0] != 0)], out_file)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--paths", nargs="+", default=["dense", "flex"], choices=["dense", "flex"])
    ap.add_argument("--out", default="", help="also append the JSON line to this file")
    ap.add_argument("--child", nargs=4, metavar=("PATH", "L", "LAYOUT", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        path, L, lay, out = args.child
        print(json.dumps(measure(path, int(L), lay, out)))
        return
    result = {"what": "attention_memory", "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "fp32",
              "threads": 1, "torch": torch.__version__, "device": "cpu", "by_length": {}}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        for L in args.lengths:
            lay = layout(L)
            torch.save(lay, f"{tmp}/layout.pt")
            real = int((lay["kind"] != 0).sum())
            entry = {"real_tokens": real, "samples": int(lay["doc"].max()) + 1}
            for path in args.paths:
                run = subprocess.run([sys.executable, __file__, "--child", path, str(L), f"{tmp}/layout.pt",
                                      f"{tmp}/{path}.pt"], capture_output=True, text=True, env=env)
                if run.returncode:  # killed for memory (-9) or failed: say so, keep going
                    entry[path] = {"did_not_fit_or_failed": run.returncode, "stderr": run.stderr.strip()[-300:]}
                else:
                    entry[path] = json.loads(run.stdout.strip().splitlines()[-1])
            if all(os.path.exists(f"{tmp}/{p}.pt") for p in ("dense", "flex")) and len(args.paths) == 2:
                a, b = torch.load(f"{tmp}/dense.pt"), torch.load(f"{tmp}/flex.pt")
                entry["max_abs_diff_flex_vs_dense"] = float((a - b).abs().max())
            for p in ("dense", "flex"):
                if os.path.exists(f"{tmp}/{p}.pt"):
                    os.remove(f"{tmp}/{p}.pt")
            result["by_length"][str(L)] = entry
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
