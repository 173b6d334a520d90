#!/usr/bin/env bash
# The GPU checks of issue 14 in one run, for a machine with CUDA (about 6-9 minutes on an H100):
# the gpu-marked tests, then step time and memory of the MNIST CNN and the small GPT against
# non-private and Opacus (hooks, ghost) at batch 256 and 1024, eager engines, the graphed engine
# and the compiled engine (CUDA graphs), then the per-step overhead benchmark.  Every part has its
# own time limit, so one that hangs or fails does not cost the others.  Logs and JSON go to ${OUT:-.}/gpu_*.
# Run from the repository root; needs opacus for the Opacus rows (they say so when it is missing).
set -u
out="${OUT:-.}"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
# only the files that hold gpu tests: collecting the whole suite imports every optional extra
files=$(grep -rl "mark.gpu" tests | sort)
per_test=""; "$py" -c "import pytest_timeout" 2>/dev/null && per_test="--timeout 150"
timeout "${GPU_TESTS_S:-200}" "$py" -m pytest -q -p no:cacheprovider -m gpu -n "${GPU_WORKERS:-6}" \
  $per_test -rfE --tb=short $files 2>&1 | tee "$out/gpu_tests.log" | tail -40
# the compiled engine had not finished compiling the GPT after 140 s on an H100: GPT without it
for b in 256 1024; do
  for c in "mnist --compiled --graphed" "gpt --graphed"; do
    set -- $c
    timeout "${GPU_BENCH_S:-140}" "$py" benchmarks/bench_architectures.py --device cuda --cases "$@" \
      --batch-size "$b" --reps 5 --json "$out/gpu_$1_b$b.json" 2>&1 | grep --line-buffered -v "^USDT" \
      | tee "$out/gpu_$1_b$b.log"
  done
done
timeout "${GPU_OVERHEAD_S:-50}" "$py" benchmarks/bench_overhead.py --device cuda --repeats 5 2>&1 \
  | tee "$out/gpu_overhead.log" | tail -9
