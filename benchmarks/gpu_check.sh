#!/usr/bin/env bash
# The GPU measurements in one prepared call, for a session lent a CUDA machine (about 10 minutes):
#   bash benchmarks/gpu_check.sh [OUTPUT_FOLDER]      (default: $OUT, else benchmarks/results)
# 1. the CUDA tests: the replay on the device, a sync-free update, the CUDA graph replaying the compiled step;
# 2. ms per update: eager, compiled, compiled + CUDA graph, for both replay buffers;
# 3. one whole train.py run's env steps/s, compiled with and without --cuda-graphs (UTD 1, as the defaults).
# Each part's output is written as it finishes, so a run cut short keeps what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$out"
report="$out/$(date +%F)_gpu_check.md"
{
  echo "# GPU check, $(date +%F)"
  echo
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  echo
  echo '## python -m pytest -q tests/test_sac_model.py -k "cuda or compile"'
  echo '```'
  python -m pytest -q tests/test_sac_model.py -k "cuda or compile" 2>&1 | tail -n 5
  echo '```'
  echo
  echo "## python benchmarks/bench_cuda_update.py"
  echo '```'
  python benchmarks/bench_cuda_update.py 2>&1
  echo '```'
  for flags in "--update-every 50" "--update-every 50 --cuda-graphs"; do
    echo
    echo "## python benchmarks/bench_parallel_runs.py --device cuda --runs 1 --train-args \"$flags\""
    python benchmarks/bench_parallel_runs.py --device cuda --runs 1 --train-args "$flags" 2>&1
  done
} | tee "$report"
