#!/usr/bin/env bash
# The prepared run for a session lent a GPU (one call, under 9 minutes on an H100: the step limits
# add up to 530 s): what the CPU machines cannot check or measure. Every step has its own time
# limit; each writes JSON under $OUT; the most valuable steps come first.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_session.sh            # on the device machine, from the repo root
#   python -m experiments.gpu_report --dir=/tmp/gpu --out=benchmarks/results/gpu_$(date +%F).md   # here
#
# 1. kernel tests compiled for the card (tests pick compiled mode when the backend is a GPU), and
#    the per-card tile configs against the card's shared memory
# 2. the attention kernels re-timed (issue: attention kernels)
# 3. the weight-only quantised matmul against the bf16 GEMV and the roofline (issue: quantisation)
# 4. the engine's batch-1 step overhead on a Llama-3-8B-shaped bf16 model, overlap off and on
# 5. continuous vs static batching on the same model, skewed output lengths (issue: batching)
# 6. speculative decoding with the synthetic drafter, acceptance 0.8, k=5, on the same model
# 7. 64 distinct rank-16 LoRA adapters in a batch of 64 against the base, on the same model
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
step() { local limit=$1; shift; echo "== [$(date +%T)] $* (limit ${limit}s)"; timeout "$limit" "$@"; echo "== exit $?"; }

nvidia-smi -L
python3 -c "import jax; print(jax.__version__, jax.devices())"
step 80 python3 -m pytest -q -x -p no:cacheprovider -o addopts="" tests/test_quant_matmul.py tests/test_tuned_configs.py 2>&1 | tail -15
step 90 python3 -m experiments.bench_kernels --runs=10 --out="$OUT/kernels.json"
step 50 python3 -m experiments.bench_quant_matmul --out="$OUT/quant_matmul.json"
for overlap in false true; do
  step 40 python3 -m experiments.bench_batching --model=random:llama3_8b --dtype=bfloat16 --step_overhead=128 \
    --overlap=$overlap --out="$OUT/overhead_overlap-$overlap.json"
done
# --warmup=replay compiles only the programs the run hits (the full Engine.warmup set of an 8B model
# would take much of this step's time limit to compile).
SKEWED="--model=random:llama3_8b --dtype=bfloat16 --num_requests=64 --max_batch=8 --prompt_dist=fixed --prompt_len=32
  --output_dist=lognormal --output_len=64 --sigma=1.2 --max_len=400 --warmup=replay"
step 55 python3 -m experiments.bench_batching $SKEWED --batching=continuous --out="$OUT/skewed_continuous.json"
step 55 python3 -m experiments.bench_batching $SKEWED --batching=static --out="$OUT/skewed_static.json"
step 60 python3 -m experiments.spec_decode --model=random:llama3_8b --dtype=bfloat16 --methods=synthetic \
  --spec_accept=0.8 --ks=5 --num_prompts=4 --prompt_len=32 --max_tokens=64 --out="$OUT/spec_synthetic.json"
step 60 python3 -m experiments.lora_batching --model=random:llama3_8b --dtype=bfloat16 --adapters=64 --ranks=16 \
  --composition=distinct --num_requests=64 --prompt_len=32 --output_len=32 --runs=1 --out="$OUT/lora_64.json"
ls -la "$OUT"
