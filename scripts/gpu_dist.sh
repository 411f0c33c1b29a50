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
#   bench:N:LENGTHS  N ranks, a full prefill of each length (short lengths only, as above)
# Every model is the 30B hybrid with random weights (random:superlinear-exp-30b). Carry `.whl`:
# fla-core 0.6.0 and transformers 5.24.0 wheels. JSON and logs go to $OUT. Every step runs; the
# exit status is 1 when any failed (scripts/gpu_common.sh); fit fails when not even its first
# length fits.
cd "$(dirname "$0")/.." || exit 1
source scripts/gpu_common.sh
prepare_run
MODEL=random:superlinear-exp-30b
SPLIT_CHUNK=${SPLIT_CHUNK:-1024}
GPUS=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)

bench() {  # bench NAME N LENGTH(S) EXTRA...: one bench run, JSON to $OUT/NAME.json, its table to stdout
  local name=$1 n=$2 lengths=$3
  shift 3
  local launch=(python3 -m superlinear.cli.main)
  if ((n > 1)); then
    ((GPUS >= n)) || { echo "needs $n GPUs, this machine has $GPUS"; return 1; }
    launch=(python3 -m torch.distributed.run --standalone --nproc-per-node "$n" -m superlinear.cli.main)
  fi
  timeout 590 "${launch[@]}" bench generate --model "$MODEL" --world-size "$n" --lengths "$lengths" \
    --attention superlinear --decode-tokens 32 --json "$@" > "$OUT/$name.json" 2> >(tail -c 4000 >> "$OUT/$name.err") \
    || { echo "$name: failed (see $name.err)"; tail -5 "$OUT/$name.err"; return 1; }
  python3 -c "import json,sys; from superlinear.plugins.bench.generate import markdown;
print(markdown(json.load(open(sys.argv[1]))))" "$OUT/$name.json"
}

fits() {  # fits NAME: 0 when the run's rows have no error
  python3 -c "import json,sys; rows = json.load(open(sys.argv[1]))['rows']; sys.exit(any('error' in r for r in rows))" \
    "$OUT/$1.json" 2>/dev/null
}

dist_tests() {
  timeout 590 python3 -m pytest -q -m gpu tests/test_distributed_gpu.py -p no:cacheprovider -rs 2>&1 \
    | tee -a "$OUT/dist_tests.log"
}

fit() {  # fit N LENGTHS: the largest of LENGTHS (ascending) whose probe fits on N GPUs
  local n=$1 lengths=$2 largest="" length
  for length in ${lengths//,/ }; do
    if bench "fit${n}_${length}" "$n" "$length" --probe --chunk-size "$SPLIT_CHUNK" && fits "fit${n}_${length}"; then
      largest=$length
    else
      break
    fi
  done
  if [ -z "$largest" ]; then
    echo "fit:$n: not even ${lengths%%,*} fits"
    return 1
  fi
  echo "largest context that fits on $n GPUs: $largest (of $lengths)"
}

(($# > 0)) || set -- tests one:10M probe:2:10M fit:2:20M,24M,26M
for step_spec in "$@"; do
  IFS=':' read -r kind n lengths <<< "$step_spec"
  case $kind in
    tests) step "$step_spec" dist_tests ;;
    one) step "$step_spec" bench "one_${n//,/_}" 1 "$n" --probe ;;
    probe) step "$step_spec" bench "probe${n}_${lengths//,/_}" "$n" "$lengths" --probe --chunk-size "$SPLIT_CHUNK" ;;
    bench) step "$step_spec" bench "bench${n}_${lengths//,/_}" "$n" "$lengths" ;;
    fit) step "$step_spec" fit "$n" "$lengths" ;;
    *) step "$step_spec" unknown_step "$step_spec" ;;
  esac
done
finish
