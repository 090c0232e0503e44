#!/usr/bin/env bash
# The GPU check of issue 20 on one H200, under 8 minutes: one JSON line per check on stdout (logs on stderr).
#   bash benchmarks/gpu_check.sh                        # cuda_parity, scale_small_packed, shapes_steps, moe_grouped_cuda
#   bash benchmarks/gpu_check.sh --device cpu --tiny    # toy sizes on CPU; the GPU-only checks print "skipped"
#   bash benchmarks/gpu_check.sh --only scale_small_packed --attention sdpa
# Each check runs in its own process under a time limit (benchmarks/gpu_check.py says what each measures);
# a failed or killed one prints {"check": ..., "error": ...} and the others still run. The Python is
# .venv/bin/python where there is one, else python3 (the device machine's, which holds a CUDA torch),
# with src/ on the path so nothing needs installing. A lent GPU's lines go into docs/RESULTS.md:
#   { echo "# bash benchmarks/gpu_check.sh"; bash benchmarks/gpu_check.sh; } > docs/results/bench/gpu_check.jsonl
#   repforce study report --quiet
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$@"
