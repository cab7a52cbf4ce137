#!/usr/bin/env bash
# ms per step of GD, GD + k = 1 / k = 3 eigenpairs and the central flow at d ~ 3k, 30k, 300k, 3M
# on a CUDA jax (benchmarks/gpu.py). Without a GPU it says so and exits with status 2.
#   benchmarks/gpu.sh [--steps N]        on a GPU machine
#   benchmarks/gpu.sh --cpu-smoke        d ~ 3k and 30k, 20 steps, on the CPU: checks the script
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [[ "${1:-}" == "--cpu-smoke" ]]; then
    shift
    exec "$PYTHON" benchmarks/gpu.py --device cpu --widths 32 140 --steps 20 "$@"
fi
exec "$PYTHON" benchmarks/gpu.py --device gpu "$@"
