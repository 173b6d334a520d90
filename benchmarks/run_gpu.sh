#!/usr/bin/env bash
# The GPU checks of issue 14 in one run, for a machine with CUDA (about 5-8 minutes on an H100):
# the gpu-marked tests, then step time and memory of the MNIST CNN and the small GPT against
# non-private and Opacus (hooks, ghost) at batch 256 and 1024, eager engines and the compiled
# engine (CUDA graphs).  Results go to stdout and, as JSON, to ${OUT:-.}/gpu_*.json.
set -u
out="${OUT:-.}"
python -m pytest -q -p no:cacheprovider -m gpu tests/ 2>&1 | tail -15
for b in 256 1024; do
  python benchmarks/bench_architectures.py --device cuda --cases mnist,gpt --compiled --batch-size "$b" \
    --reps 5 --json "$out/gpu_architectures_b$b.json" 2>&1 | grep -v "^USDT"
done
python benchmarks/bench_overhead.py --device cuda --repeats 5 2>&1 | tail -9
