#!/usr/bin/env bash
# Throughput benchmark on one CUDA GPU: the 10^6 one-dimensional posteriors target (issue 5),
# w1, 4 chains x 1000 tune + 1000 draws, beside a short pm.sample loop on the host's CPUs.
#
#   bash benchmarks/gpu.sh                 # install (if needed) and run
#   N=10000,100000 bash benchmarks/gpu.sh  # other problem counts
#
# Environment knobs (defaults in brackets):
#   N [10000,100000,1000000]   problem counts          BATCH [250000]   problems per chunk
#   CONTESTANTS [chees:f32,blackjax,blackjax:f32,pymc]  LOOP [3]         pm.sample loop problems
#   TAG [gpu_<device name>]    OUT [benchmarks/results]   VENV [.venv-gpu]
#   WHEELS [.whl]  a folder of wheels for machines without internet (pip --no-index
#                  --find-links); fill it beforehand with
#                  pip download -d .whl -e ".[cuda]" --python-version 3.11 --only-binary=:all:
#   TIMEOUT [3000] seconds before the run is stopped (partial rows are lost; lower N first)
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-10000,100000,1000000}
BATCH=${BATCH:-250000}
CONTESTANTS=${CONTESTANTS:-chees:f32,blackjax,blackjax:f32,pymc}
LOOP=${LOOP:-3}
OUT=${OUT:-benchmarks/results}
VENV=${VENV:-.venv-gpu}
WHEELS=${WHEELS:-.whl}
TIMEOUT=${TIMEOUT:-3000}
PY=${PY:-python3.11}

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import jax, engine; assert jax.default_backend() == 'gpu'" 2>/dev/null; then
  if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install -q --no-index --find-links "$WHEELS" -e ".[cuda]"
  else
    "$VENV/bin/python" -m pip install -q -e ".[cuda]"
  fi
fi
"$VENV/bin/python" -c "import jax; print('JAX', jax.__version__, jax.devices())"

DEVICE=$("$VENV/bin/python" -c "import jax; print(jax.devices()[0].device_kind.replace(' ', '_'))")
TAG=${TAG:-gpu_${DEVICE}}

# Let XLA take most of the GPU (the default 75% pre-allocation is fine too); keep x64 on the
# float64 contestants' own terms (the engine switches precision per run).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
timeout "$TIMEOUT" "$VENV/bin/python" -m benchmarks.throughput \
  --workloads w1 --n "$N" --contestants "$CONTESTANTS" --batch-size "$BATCH" \
  --loop-problems "$LOOP" --repeats 1 --out "$OUT" --tag "$TAG" "$@"
echo "results: $OUT/$TAG.{json,md} and $OUT/${TAG}_scaling.png"
