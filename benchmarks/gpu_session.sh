#!/usr/bin/env bash
# The prepared run for a session lent a GPU (one call, under 9 minutes on an H100: the step limits
# add up to 539 s): what the CPU machines cannot check or measure. Every step has its own time
# limit and must exit 0 and write its JSON under $OUT; the most valuable steps come first. The
# script goes on past a failed step, lists every step's exit status and seconds in $OUT/steps.tsv
# and exits 1 if any failed.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_session.sh            # on the device machine, from the repo root
#   python -m jaxinfer.experiments.gpu_report --dir=/tmp/gpu --out=benchmarks/results/gpu_$(date +%F).md   # here
#
# The rehearsal (CI's slow tier runs it; about 2 minutes on a 2-core CPU): the same steps, commands
# and flags on the CPU, the Pallas kernels in interpret mode (--quick), the Llama-3-8B shape replaced
# by configs/rehearsal/llama3_8b_small.json (same family, a CPU-sized shape), 16 requests instead of
# 64 in the skewed and LoRA runs, XLA's cheap CPU compile settings, and every step limit scaled by
# 0.45 (the sum under 4 minutes). Its figures are not measurements; gpu_report says so.
#
#   REHEARSE=1 OUT=/tmp/rehearsal bash benchmarks/gpu_session.sh
#
#  1. kernel tests compiled for the card (tests pick compiled mode when the backend is a GPU): the
#     weight-only quantised matmul and the grouped GEMMs (dense and int8/int4 experts), and the
#     per-card tile configs against the card's shared memory
#  2. the attention kernels re-timed (issue: attention kernels)
#  3. the weight-only and W8A8 quantised matmuls against the bf16 GEMV/GEMM and the roofline
#  4. the engine's batch-1 step overhead on a Llama-3-8B-shaped bf16 model, overlap off and on
#  5. continuous vs static batching on the same model, skewed output lengths (issue: batching)
#  6. speculative decoding at acceptance 0.8, k=5, on the same model: the synthetic drafter (drafting
#     for free) and a random EAGLE-3 head of the 8B shape (its true drafting cost)
#  7. 64 distinct rank-16 LoRA adapters in a batch of 64 against the base, on the same model
#  8. the sampler at batch 64 over Llama-3's 128,256-token vocabulary, logprobs (top 5) among the
#     variants: the per-step cost a request for logprobs adds
#  9. one Mixtral-8x7B-shaped MoE layer in bf16 (issue: model families): the grouped matmul through
#     ragged_dot and the Pallas grouped GEMM against a loop over experts, by tokens per step
# 10. multi-head latent attention's decode over a latent cache, DeepSeek-V3's 128 heads, bf16, batch 8
#     (issue: MLA): the absorbed form against the expanded one by context length (XLA: the latent
#     decode kernel's tile would pad the 576-wide rows to 1024, past an H100's shared memory)
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/gpu_session}
REHEARSE=${REHEARSE:-0}
mkdir -p "$OUT"
if [ "$REHEARSE" = 1 ]; then
  MODEL=random:configs/rehearsal/llama3_8b_small.json
  QUICK=--quick          # bench_kernels, bench_quant_matmul: interpret mode, tiny shapes, 2 runs
  SCALE=${REHEARSE_SCALE:-45}  # percent of each step's device limit (the test suite's run, on a machine
                               # loaded by other tests, passes 100: it checks that every step runs)
  TESTS=(tests/test_tuned_configs.py)  # the kernels' own tests run interpreted in the everyday suite
  REQUESTS=16            # requests of the skewed and LoRA runs (64 on the card): compiling dominates here
  SAMPLER="--rows=8 --vocab=2048 --runs=2"
  MOE="--moe_hidden=64 --moe_ffn=128 --tokens=1,16 --runs=1"  # interpret mode: CPU-sized
  MLA="--mla_heads=4 --kv_lora_rank=32 --qk_rope_head_dim=8 --qk_nope_head_dim=16 --v_head_dim=16 --contexts=64,256
    --runs=1 --calls=2"
  # XLA's cheap CPU compile settings, as the test suite uses (tests/conftest.py): compiling is most of
  # a rehearsal's time
  export XLA_FLAGS=${XLA_FLAGS:-"--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true
    --xla_cpu_use_fusion_emitters=false"}
else
  MODEL=random:llama3_8b
  QUICK=
  SCALE=100
  TESTS=(tests/test_quant_matmul.py tests/test_grouped_matmul.py tests/test_tuned_configs.py)
  REQUESTS=64
  SAMPLER="--rows=64 --vocab=128256"
  MOE="--moe_hidden=4096 --moe_ffn=14336 --tokens=1,8,64,512 --runs=5"  # Mixtral-8x7B's layer
  MLA="--mla_heads=128 --contexts=1024,8192,32768 --mla_batch=8 --runs=3 --calls=10"  # DeepSeek-V3's attention
fi
printf "# mode\t%s\n" "$([ "$REHEARSE" = 1 ] && echo rehearsal || echo device)" > "$OUT/steps.tsv"
printf "step\tlimit_s\texit\tseconds\tjson\n" >> "$OUT/steps.tsv"
FAILED=0

# step NAME LIMIT_S CMD...: runs CMD under the scaled limit; passes when it exits 0 and, unless
# NAME is "-", wrote $OUT/NAME.json.
step() {
  local name=$1 limit=$(( $2 * SCALE / 100 )) t0 rc json=-; shift 2
  echo "== [$(date +%T)] $name: $* (limit ${limit}s)"
  t0=$(date +%s)
  timeout "$limit" "$@"
  rc=$?
  if [ "$name" != "-" ]; then
    json=$OUT/$name.json
    if [ "$rc" -eq 0 ] && [ ! -s "$json" ]; then echo "== $name exited 0 but wrote no $json"; rc=1; fi
  fi
  [ "$rc" -eq 0 ] || FAILED=$((FAILED + 1))
  printf "%s\t%s\t%s\t%s\t%s\n" "$name" "$limit" "$rc" "$(( $(date +%s) - t0 ))" "$json" >> "$OUT/steps.tsv"
  echo "== $name: exit $rc$([ "$rc" -eq 124 ] && echo ' (over its time limit)')"
}

nvidia-smi -L 2>/dev/null || echo "no nvidia-smi (rehearsal: $REHEARSE)"
python3 -c "import jax; print(jax.__version__, jax.devices())"
step - 75 python3 -m pytest -q -x -p no:cacheprovider -o addopts="" "${TESTS[@]}"
step kernels 62 python3 -m experiments.bench_kernels $QUICK --runs=10 --out="$OUT/kernels.json"
step quant_matmul 50 python3 -m experiments.bench_quant_matmul $QUICK --out="$OUT/quant_matmul.json"
for overlap in false true; do
  step overhead_overlap-$overlap 35 python3 -m experiments.bench_batching --model=$MODEL --dtype=bfloat16 \
    --step_overhead=128 --overlap=$overlap --out="$OUT/overhead_overlap-$overlap.json"
done
# --warmup=replay compiles only the programs the run hits (the full Engine.warmup set of an 8B model
# would take much of this step's time limit to compile).
SKEWED="--model=$MODEL --dtype=bfloat16 --num_requests=$REQUESTS --max_batch=8 --prompt_dist=fixed --prompt_len=32
  --output_dist=lognormal --output_len=64 --sigma=1.2 --max_len=400 --warmup=replay"
step skewed_continuous 55 python3 -m experiments.bench_batching $SKEWED --batching=continuous \
  --out="$OUT/skewed_continuous.json"
step skewed_static 55 python3 -m experiments.bench_batching $SKEWED --batching=static --out="$OUT/skewed_static.json"
step spec_synthetic 64 python3 -m experiments.spec_decode --model=$MODEL --dtype=bfloat16 --methods=synthetic,eagle3:random \
  --spec_accept=0.8 --ks=5 --num_prompts=4 --prompt_len=32 --max_tokens=64 --out="$OUT/spec_synthetic.json"
step lora_64 52 python3 -m experiments.lora_batching --model=$MODEL --dtype=bfloat16 --adapters=64 --ranks=16 \
  --composition=distinct --num_requests=$REQUESTS --prompt_len=32 --output_len=32 --runs=1 --out="$OUT/lora_64.json"
step sampler 20 python3 -m experiments.bench_sampler $SAMPLER --out="$OUT/sampler.json"
step moe 20 python3 -m experiments.bench_moe $MOE --dtype=bfloat16 --paths=xla,pallas,loop --out="$OUT/moe.json"
step mla 16 python3 -m experiments.bench_mla $MLA --dtype=bfloat16 --attention=xla --out="$OUT/mla.json"

echo "== steps (exit, seconds):"
column -t -s $'\t' "$OUT/steps.tsv" 2>/dev/null || cat "$OUT/steps.tsv"
ls -la "$OUT"
if [ "$FAILED" -gt 0 ]; then
  echo "== $FAILED step(s) failed"
  exit 1
fi
