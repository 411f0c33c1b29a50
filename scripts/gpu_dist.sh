#!/bin/bash
# One session's context over several GPUs (superlinear.distributed, docs/distributed.md) on the
# device machine (nvidia-h200-x2 / -x4: torch 2.11, triton 3.6, no fastapi), from the source tree:
#   bash scripts/gpu_dist.sh STEP...      (no STEP: tests one:10M probe:2:10M fit:2:20M,24M,26M)
# STEP:
#   tests            tests/test_distributed_gpu.py: two ranks over NCCL give what one GPU gives
#   one:LENGTHS      one GPU, the usual kernels and CUDA graph, --probe at each length (the
#                    last prefill chunk and 32 decode steps at that depth): the baseline
#   probe:N:LENGTHS  the same on N ranks (torchrun), the context split over them, with a prefill
#                    chunk of $SPLIT_CHUNK tokens (default 1024: the split prefill runs the PyTorch
#                    reference attention, one row per block at these depths; a 32K chunk there
#                    would take minutes). Decode runs the split Triton decode, eagerly.
#   fit:N:LENGTHS    N ranks, probe at each length in turn (ascending) until one does not fit:
#                    prints the largest context that fits on N GPUs (with a $SPLIT_CHUNK-token
#                    chunk: a 32K chunk's activations need ~5 GiB more per GPU, ~0.8M tokens of KV)
#   bench:N:LENGTHS  N ranks, a full prefill of each length (short lengths: the split attention
#                    runs the PyTorch reference kernel until the Triton kernels take a key slice)
# Every model is the 30B hybrid with random weights (random:superlinear-exp-30b). Carry `.whl`:
# fla-core 0.6.0 and transformers 5.24.0 wheels. JSON and logs go to $OUT. Exits non-zero when a
# step fails (for fit: when not even its first length fits).
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
MODEL=random:superlinear-exp-30b
SPLIT_CHUNK=${SPLIT_CHUNK:-1024}
source scripts/gpu_tree.sh
GPUS=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)

bench() {  # bench NAME N LENGTH(S) EXTRA...: one bench run, JSON to $OUT/NAME.json, its table to stdout
  local name=$1 n=$2 lengths=$3; shift 3
  local launch=(python3 -m superlinear.cli.main)
  if [ "$n" -gt 1 ]; then
    [ "$GPUS" -ge "$n" ] || { echo "needs $n GPUs, this machine has $GPUS"; return 1; }
    launch=(python3 -m torch.distributed.run --standalone --nproc-per-node "$n" -m superlinear.cli.main)
  fi
  timeout 590 "${launch[@]}" bench generate --model "$MODEL" --world-size "$n" --lengths "$lengths" \
    --attention superlinear --decode-tokens 32 --json "$@" > "$OUT/$name.json" 2> >(tail -c 4000 >> "$OUT/$name.err") \
    || { echo "$name: failed (see $name.err)"; tail -5 "$OUT/$name.err"; return 1; }
  python3 -c "import json,sys; from superlinear.plugins.bench.generate import markdown;
print(markdown(json.load(open(sys.argv[1]))))" "$OUT/$name.json"
}

fits() {  # fits NAME: 0 when the run's only row has no error
  python3 -c "import json,sys; rows = json.load(open(sys.argv[1]))['rows']; sys.exit(any('error' in r for r in rows))" \
    "$OUT/$1.json" 2>/dev/null
}

status=0
[ $# -gt 0 ] || set -- tests one:10M probe:2:10M fit:2:20M,24M,26M
for step in "$@"; do
  echo "=== $step ($(date -u +%H:%M:%S))"
  case $step in
    tests)
      timeout 590 python3 -m pytest -q -m gpu tests/test_distributed_gpu.py -p no:cacheprovider -rs 2>&1 \
        | tee -a "$OUT/dist_tests.log" || status=1 ;;
    one:*)
      lengths=${step#one:}
      bench "one_${lengths//,/_}" 1 "$lengths" --probe || status=1 ;;
    probe:*|bench:*)
      IFS=':' read -r kind n lengths <<< "$step"
      extra=(); [ "$kind" = probe ] && extra=(--probe --chunk-size "$SPLIT_CHUNK")
      bench "${kind}${n}_${lengths//,/_}" "$n" "$lengths" "${extra[@]}" || status=1 ;;
    fit:*)
      IFS=':' read -r _ n lengths <<< "$step"
      largest=""
      for length in ${lengths//,/ }; do
        if bench "fit${n}_${length}" "$n" "$length" --probe --chunk-size "$SPLIT_CHUNK" \
            && fits "fit${n}_${length}"; then
          largest=$length
        else
          break
        fi
      done
      if [ -n "$largest" ]; then echo "largest context that fits on $n GPUs: $largest (of $lengths)"
      else echo "fit:$n: not even ${lengths%%,*} fits"; status=1; fi ;;
    *)
      echo "unknown step $step"; status=2 ;;
  esac
done
echo "=== done ($(date -u +%H:%M:%S)), status $status"
exit $status
