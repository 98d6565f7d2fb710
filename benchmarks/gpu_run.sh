#!/usr/bin/env bash
# The GPU benchmark on a lent machine: install the carried wheels (benchmarks/gpu_wheels.sh made them), then run
# benchmarks/gpu.py with its log beside gpu.json and gpu.md in $OUT (default gpu-bench-out).
#
#   bash benchmarks/gpu_run.sh [gpu.py options, e.g. --sections extract finetune]
set -euo pipefail
cd "$(dirname "$0")/.."

site=${TMPDIR:-/tmp}/clipspm-site
if compgen -G ".gpu-wheels/*.whl" >/dev/null; then
  python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    .gpu-wheels/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
out=${OUT:-gpu-bench-out}
mkdir -p "$out"
python3 benchmarks/gpu.py --out "$out" "$@" 2>&1 | tee "$out/gpu.log"
