#!/usr/bin/env bash
# The prepared run for a session lent a GPU (one call, about 10 minutes on an H100): what the CPU
# machines cannot check or measure. Every step has its own time limit; each writes under $OUT.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_session.sh            # on the device machine, from the repo root
#
# 1. the kernel tests compiled for the card (tests pick compiled mode when the backend is a GPU)
# 2. the weight-only quantised matmul against the bf16 GEMV and the roofline (issue: quantisation)
# 3. the engine's batch-1 step overhead on a Llama-3-8B-shaped bf16 model, overlap off and on
# 4. continuous vs static batching on the same model, skewed output lengths (issue: batching)
# 5. the attention kernels re-timed (issue: attention kernels)
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
step() { local limit=$1; shift; echo "== [$(date +%T)] $* (limit ${limit}s)"; timeout "$limit" "$@"; echo "== exit $?"; }

nvidia-smi -L
python3 -c "import jax; print(jax.__version__, jax.devices())"
step 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_quant_matmul.py 2>&1 | tail -15
step 120 python3 -m experiments.bench_quant_matmul --out="$OUT/quant_matmul.json"
for overlap in false true; do
  step 120 python3 -m experiments.bench_batching --model=random:llama3_8b --dtype=bfloat16 --step_overhead=256 \
    --overlap=$overlap --out="$OUT/overhead_overlap-$overlap.json"
done
# --warmup=replay compiles only the programs the run hits (the full Engine.warmup set of an 8B model
# would take much of this step's time limit to compile).
SKEWED="--model=random:llama3_8b --dtype=bfloat16 --num_requests=64 --max_batch=8 --prompt_dist=fixed --prompt_len=32
  --output_dist=lognormal --output_len=64 --sigma=1.2 --max_len=400 --warmup=replay"
step 120 python3 -m experiments.bench_batching $SKEWED --batching=continuous --out="$OUT/skewed_continuous.json"
step 120 python3 -m experiments.bench_batching $SKEWED --batching=static --out="$OUT/skewed_static.json"
step 150 python3 -m experiments.bench_kernels --runs=10 --out="$OUT/kernels.json"
