"""What the server's batching buys: R concurrent generation requests of n images each against the
same R requests sent one after another, over loopback to a `repforce serve` process.

    .venv/bin/python benchmarks/serve_batching.py --ckpt shapes --requests 32 --n 4

Starts `repforce serve --no-app` on a free port, warms it up, then runs the two orders in turn
(sequential first) and prints one JSON line: images/s of each, their ratio, p50/p95 latency per
request, the number of batches the concurrent requests took, and the ceiling: the engine's own
seconds per image at batch n against batch --max-batch, measured in this process after the server
stops (what batching can buy at most on this machine). Bounded: every request has a --timeout.
Run nothing else meanwhile (two cores: any second busy process skews the ratio).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from repforce.worlds import shapeseval


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stats(latencies: list[float], wall: float, images: int) -> dict:
    return {"wall_s": round(wall, 2), "images_per_s": round(images / wall, 2),
            "p50_s": round(float(np.percentile(latencies, 50)), 3), "p95_s": round(float(np.percentile(latencies, 95)), 3)}


def _engine_ceiling(ckpt: str, n: int, big: int, steps: int, prompts: list[str]) -> dict:
    """Seconds per image of the engine alone at batch n and at batch `big`, in this process: their ratio
    is what batching can buy at most, before any HTTP."""
    from repforce.engine import GenOptions, load

    eng, o = load(ckpt, precision="fp32"), GenOptions(steps=steps)
    per = {}
    for b in (n, big):
        rows = [prompts[i % len(prompts)] for i in range(b)]
        eng.generate_arrays(rows, 1, list(range(b)), o, batch_size=big)  # warm-up
        t = time.perf_counter()
        eng.generate_arrays(rows, 1, list(range(b)), o, batch_size=big)
        per[b] = (time.perf_counter() - t) / b
    return {"engine_s_per_image": {str(k): round(v, 3) for k, v in per.items()},
            "engine_ceiling": round(per[n] / per[big], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="shapes")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--n", type=int, default=4, help="images per request")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-wait-ms", type=float, default=50.0)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    ap.add_argument("--out", default="", help="append the JSON line here too")
    args = ap.parse_args()

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cli = Path(sys.executable).parent / "repforce"
    server = subprocess.Popen([cli, "serve", "--ckpt", args.ckpt, "--port", str(port), "--no-app",
                               "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
                               "--max-queue", str(max(512, args.requests * args.n))])
    try:
        for _ in range(600):
            try:
                httpx.get(url + "/health", timeout=2).raise_for_status()
                break
            except httpx.HTTPError:
                if server.poll() is not None:
                    raise SystemExit(f"repforce serve exited with {server.returncode}")
                time.sleep(0.2)
        prompts = [p.text for p in shapeseval.prompts(10)]
        bodies = [{"prompt": prompts[i % len(prompts)], "n": args.n, "steps": args.steps, "seed": 1000 * i}
                  for i in range(args.requests)]
        client = httpx.Client(timeout=args.timeout, limits=httpx.Limits(max_connections=args.requests + 4))

        def send(body) -> float:
            t = time.perf_counter()
            r = client.post(url + "/v1/images/generations", json=body)
            r.raise_for_status()
            assert len(r.json()["data"]) == body["n"]
            return time.perf_counter() - t

        send(bodies[0])  # warm-up: first-call allocations
        t0 = time.perf_counter()
        seq = [send(b) for b in bodies]
        seq_wall = time.perf_counter() - t0
        before = httpx.get(url + "/health").json()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.requests) as pool:
            conc = list(pool.map(send, bodies))
        conc_wall = time.perf_counter() - t0
        after = httpx.get(url + "/health").json()
        images = args.requests * args.n
        server.terminate()
        server.wait(30)
        ceiling = _engine_ceiling(args.ckpt, args.n, args.max_batch, args.steps, prompts)
        row = {"bench": "serve_batching", "ckpt": args.ckpt, "requests": args.requests, "n": args.n,
               "steps": args.steps, "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
               "sequential": _stats(seq, seq_wall, images), "concurrent": _stats(conc, conc_wall, images),
               "speedup": round(seq_wall / conc_wall, 2),
               "concurrent_batches": after["batches"] - before["batches"], **ceiling}
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
