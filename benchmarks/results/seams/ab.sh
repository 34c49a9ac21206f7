#!/usr/bin/env bash
# A/B: the commit before the seams work (A, /work/wt/before at 6efe667) against main (B), interleaved.
# usage: bash /tmp/ab.sh ROUNDS OUTDIR
set -u
ROUNDS=$1; OUT=$2; mkdir -p $OUT
SKEW="--num_requests=64 --max_batch=8 --prompt_dist=fixed --prompt_len=32 --output_dist=lognormal --output_len=64 --sigma=1.2 --max_len=400 --batching=continuous"
SMOL="--model=smollm2-135m --num_requests=16 --max_batch=8 --prompt_dist=fixed --prompt_len=32 --output_dist=lognormal --output_len=32 --sigma=0.8 --max_len=96 --batching=continuous"
run() {  # side dir name
  local side=$1 dir=$2 r=$3
  (cd $dir && python -m experiments.bench_batching $SKEW --out=$OUT/${side}_skewed_$r.json > $OUT/${side}_skewed_$r.log 2>&1)
  (cd $dir && python -m experiments.bench_batching --step_overhead=512 --out=$OUT/${side}_overhead_$r.json > $OUT/${side}_overhead_$r.log 2>&1)
  (cd $dir && python -m experiments.bench_batching $SMOL --out=$OUT/${side}_smol_$r.json > $OUT/${side}_smol_$r.log 2>&1)
  (cd $dir && python -m experiments.bench_peers --systems=jaxinfer --threads=2 --batch_sizes=1,8 --out=$OUT/${side}_peers_$r.json > $OUT/${side}_peers_$r.log 2>&1)
}
for r in $(seq 1 $ROUNDS); do
  if [ $((r % 2)) -eq 1 ]; then run A /work/wt/before $r; run B /work/main $r; else run B /work/main $r; run A /work/wt/before $r; fi
  echo "round $r done $(date -u +%H:%M) load $(cut -d' ' -f1-3 /proc/loadavg)"
done
