#!/usr/bin/env bash
# Run every benchmark with nothing else busy and save its JSON lines under docs/results/bench/,
# the command on the first line; `repforce study report` puts them into docs/RESULTS.md.
#   bash benchmarks/run_all.sh                 # all of them (about 16 minutes on 2 cores)
#   bash benchmarks/run_all.sh sampling scaling
# quantizer_stability needs a trained shapes vlm run (VLM=runs/vlm by default); quantizer_drift_* also a
# pixel_rf run trained from it (RF=runs/pixel_rf): is narrow codebook use in training the features' or the training's?
# guidance needs the full study's seed-0 runs (STUDY=runs/study/full), guidance_seed1 and guidance_cont its other seeds:
# does the guidance weight change the ranking? fashion_sampling_* and fashion_oracle need the Fashion-MNIST full
# study's seed-0 runs (FSTUDY=runs/study/fashion_full): what makes pixel_rf draw the wrong class there, its rep
# tokens, the guidance, or its pixel stage?
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
VLM=${VLM:-runs/vlm}
RF=${RF:-runs/pixel_rf}
STUDY=${STUDY:-runs/study/full}
FSTUDY=${FSTUDY:-runs/study/fashion_full}
OUT=docs/results/bench
mkdir -p "$OUT"
declare -A CMD=(
  [train_throughput]="$PY benchmarks/train_throughput.py --preset shapes --steps 10 --warmup 2"
  [train_pack]="$PY benchmarks/train_throughput.py --preset shapes --variants pixel_rf --pack 0 320 --steps 12 --warmup 2 --precision fp32"
  [train_pack_bf16]="$PY benchmarks/train_throughput.py --preset shapes --variants pixel_rf --pack 0 320 --steps 12 --warmup 2 --precision bf16"
  [train_gen_only]="$PY benchmarks/train_throughput.py --preset shapes --variants pixel_rf --pack 320 --steps 12 --warmup 2 --precision bf16 --arms joint= gen_only=train.train_only=generation,data.gen_fraction=1.0"
  [train_gen_only_fp32]="$PY benchmarks/train_throughput.py --preset shapes --variants pixel_rf --pack 320 --steps 12 --warmup 2 --precision fp32 --arms joint= gen_only=train.train_only=generation,data.gen_fraction=1.0"
  [sampling]="$PY benchmarks/sampling.py --batches 1 64 --prompt-repeat 1 8"
  [peer_transfusion]="$PY benchmarks/peer_transfusion.py --steps 10 --rounds 3"
  [scaling]="$PY benchmarks/scaling.py"
  [moe_grouped]="$PY benchmarks/moe_grouped.py"
  [attention_memory]="$PY benchmarks/attention_memory.py --lengths 8192 32768"
  [faults]="$PY benchmarks/faults.py --trials 50"
  [serve_batching]="$PY benchmarks/serve_batching.py --ckpt shapes --requests 32 --n 4"
  [quantizer_stability]="$PY benchmarks/quantizer_stability.py --vlm $VLM"
  [quantizer_drift_vlm]="$PY benchmarks/quantizer_stability.py --vlm $VLM --stream gen --settings shapes_preset --steps 1000"
  [quantizer_drift_rf]="$PY benchmarks/quantizer_stability.py --vlm $RF --stream gen --settings shapes_preset --steps 1000"
  [guidance]="$PY benchmarks/guidance_sweep.py --cfg 1 --runs $(printf "$STUDY/%s_s0 " pixel pixel_rf vae vae_rf pixel_repa pixel_cont)"
  [guidance_seed1]="$PY benchmarks/guidance_sweep.py --cfg 1 --runs $STUDY/pixel_s1 $STUDY/pixel_rf_s1"
  [guidance_cont]="$PY benchmarks/guidance_sweep.py --cfg 1 --runs $STUDY/pixel_cont_s1 $STUDY/pixel_cont_s2"
  [fashion_sampling_rf]="$PY benchmarks/fashion_sampling.py --runs $FSTUDY/pixel_rf_s0 --settings default rep_temperature=0.5 rep_cfg=4 cfg=1"
  [fashion_sampling_pixel]="$PY benchmarks/fashion_sampling.py --runs $FSTUDY/pixel_s0 --settings cfg=1"
  [fashion_oracle]="$PY benchmarks/fashion_oracle.py --runs $FSTUDY/pixel_rf_s0"
  [fashion_oracle_cont]="$PY benchmarks/fashion_oracle.py --runs $FSTUDY/pixel_cont_s0"
)
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(train_throughput sampling peer_transfusion scaling moe_grouped attention_memory quantizer_stability)
for n in "${names[@]}"; do
  [ -n "${CMD[$n]:-}" ] || { echo "unknown benchmark: $n (one of ${!CMD[*]})" >&2; exit 2; }
  echo "== $n: ${CMD[$n]}" >&2
  { echo "# .venv/bin/python ${CMD[$n]#"$PY "}"; ${CMD[$n]}; } > "$OUT/$n.jsonl.tmp"
  mv "$OUT/$n.jsonl.tmp" "$OUT/$n.jsonl"
done
