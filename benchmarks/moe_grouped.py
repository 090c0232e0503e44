"""Tokens/s of one Qwen3-MoE FFN bank (`MoEFFN`): the former per-expert loop against the grouped
form the model runs, at 128 routed experts, top-8, small widths so it fits a CPU in about a minute.

    .venv/bin/python benchmarks/moe_grouped.py                  # dim 256, expert hidden 128, 4096 tokens
    .venv/bin/python benchmarks/moe_grouped.py --impls grouped padded --tokens 1024

Prints one JSON object: tokens/s of the forward and of forward + backward for each path, and
each path's ratio to the loop. The paths alternate within each round, in one process, so they
share whatever else the machine does; each figure is the median over rounds. "grouped" is the
path MoEFFN picks on this machine (torch._grouped_mm where it runs without a host sync, else the
padded bmm); "padded" (R/k times the FLOPs) is the fallback, forced. Nothing else may run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from repforce.backbone import MoEFFN, grouped_mm_ok, moe_loop_reference


def timed(fn, x: torch.Tensor, backward: bool) -> float:
    t0 = time.perf_counter()
    if backward:
        x = x.detach().requires_grad_()
        fn(x).square().mean().backward()
    else:
        with torch.no_grad():
            fn(x)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=128, help="each routed expert's SwiGLU width")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--impls", nargs="+", default=["grouped"], choices=["grouped", "padded"])
    args = ap.parse_args()

    torch.manual_seed(0)
    moe = MoEFFN(args.dim, args.hidden, args.experts, args.top_k)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(std=0.02)
    x = torch.randn(args.tokens, args.dim)
    paths = {"loop": lambda v: moe_loop_reference(moe, v)}
    for impl in args.impls:  # "grouped" is MoEFFN's own choice; "padded" is forced
        paths[impl] = (lambda v: moe(v)) if impl == "grouped" else (lambda v: moe(v, impl="padded"))
    with torch.no_grad():
        ref = paths["loop"](x)
        err = {k: (f(x) - ref).abs().max().item() for k, f in paths.items() if k != "loop"}

    row = {"what": "moe_grouped", "experts": args.experts, "top_k": args.top_k, "dim": args.dim,
           "hidden": args.hidden, "tokens": args.tokens, "rounds": args.rounds, "threads": torch.get_num_threads(),
           "torch": torch.__version__, "grouped_uses": "_grouped_mm" if grouped_mm_ok(x, args.dim, args.hidden)
           else "padded bmm", "max_abs_diff_vs_loop": err}
    for mode, backward in (("forward", False), ("train", True)):
        for f in paths.values():  # warm-up
            timed(f, x, backward)
        times = {k: [] for k in paths}
        for _ in range(args.rounds):
            for k, f in paths.items():
                moe.zero_grad(set_to_none=True)
                times[k].append(timed(f, x, backward))
        for k in paths:
            row[f"{k}_{mode}_tokens_per_s"] = round(args.tokens / statistics.median(times[k]), 1)
            if k != "loop":
                row[f"{k}_{mode}_vs_loop"] = round(statistics.median(times["loop"]) / statistics.median(times[k]), 3)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
