#!/usr/bin/env bash
# The GPU measurement (issue 14): train and serve on the GPU with the Keras backend that is there (PyTorch,
# else JAX; the GPU hosts have no TensorFlow), no network, under 10 minutes. Prints the ratios of the CPU
# benchmarks (first run vs one backbone pass, serve vs raw, bfloat16 vs float32), images/s and GPU memory.
#
#   bench/gpu.sh --fetch-wheels   # once, where pip works: Keras and what it needs that the GPU image lacks, into .whl/
#   bench/gpu.sh [bench/gpu.py options]   # on the GPU host, with .whl/ carried along
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Keras' own needs that the GPU image (PyTorch, JAX, numpy, h5py, rich, absl-py, ml-dtypes) does not hold.
WHEELS=(keras==3.15.1 namex==0.1.0 optree==0.20.0)

if [ "${1:-}" = "--fetch-wheels" ]; then
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
  exit 0
fi

if ! "$PY" -c 'import keras' 2>/dev/null; then
  [ -d .whl ] || { echo "gpu.sh: Keras is missing; run 'bench/gpu.sh --fetch-wheels' where pip works and carry .whl" >&2; exit 1; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-site .whl/*.whl
  export PYTHONPATH=/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}
fi

if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  export KERAS_BACKEND=torch
elif "$PY" -c 'import sys, jax; sys.exit(0 if jax.devices()[0].platform == "gpu" else 1)' 2>/dev/null; then
  export KERAS_BACKEND=jax
  export XLA_PYTHON_CLIENT_PREALLOCATE=false  # report the memory used, not JAX's up-front 75%
else
  echo "gpu.sh: neither PyTorch nor JAX sees a GPU here" >&2
  exit 1
fi
export BACKBONE_WEIGHTS=none TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "date $(date -u +%F), backend $KERAS_BACKEND"
timeout 540 "$PY" bench/gpu.py "$@"
