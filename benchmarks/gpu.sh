#!/usr/bin/env bash
# Throughput on one CUDA GPU, in ONE script: w1 (1-D Normal-Normal) up to 10^6 posteriors and w4
# (ragged regressions) up to 10^5, 4 chains x 1000 tune + 1000 draws, beside a short pm.sample
# loop on the host's CPUs. Results (JSON, markdown, PNG, log) go to $OUT.
#
# For a machine without internet whose image has Python 3.12 with JAX (CUDA plugin), NumPyro,
# NumPy, SciPy, pandas, xarray, matplotlib, numba, optax, rich and psutil, but not PyMC,
# PyTensor, BlackJAX, ArviZ or hydra-core: fill .whl/ beforehand where there is internet with
#
#   bash benchmarks/gpu_wheels.sh          # Python 3.12 x86-64 wheels of the missing packages
#
# carry .whl/ with the checkout, and run
#
#   bash benchmarks/gpu.sh                 # full: w1 N=10^4,10^5,10^6; w4 N=10^4,10^5
#   QUICK=1 bash benchmarks/gpu.sh         # a minute-sized check of the whole path (CPU or GPU)
#
# The wheels are installed with --no-deps into $SITE (only where a package does not import
# already), so the image's JAX, NumPy and CUDA libraries are kept. Nothing is fetched.
#
# Knobs (defaults in brackets; QUICK=1 defaults in braces):
#   OUT [benchmarks/results]  TAG [gpu_<device>] {gpu_quick}   PY [python3]
#   WHEELS [.whl]  SITE [/tmp/site]
#   N_W1 [10000,100000,1000000] {10,40}   N_W4 [10000,100000] {10}
#   CONTESTANTS_W1 [pymc,chees:f32,blackjax:f32,blackjax] {pymc,chees:f32,blackjax:f32}
#   CONTESTANTS_W4 [pymc,chees:f32,blackjax:f32] {pymc,chees:f32}  (pymc first: a timeout cuts the last)
#   BATCH_W1 [250000] {20}   BATCH_W4 [25000] {10}   LOOP [3] {1}   DRAWS/TUNE [1000] {100}
#   TIMEOUT_W1 [300] {300}   TIMEOUT_W4 [200] {300}  seconds each part may run; rows are written
#                            as they finish, so a part stopped by its timeout keeps what it measured
set -uo pipefail
cd "$(dirname "$0")/.."

QUICK=${QUICK:-0}
PY=${PY:-python3}
OUT=${OUT:-benchmarks/results}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}
if [ "$QUICK" = 1 ]; then
  N_W1=${N_W1:-10,40}; N_W4=${N_W4:-10}
  CONTESTANTS_W1=${CONTESTANTS_W1:-pymc,chees:f32,blackjax:f32}; CONTESTANTS_W4=${CONTESTANTS_W4:-pymc,chees:f32}
  BATCH_W1=${BATCH_W1:-20}; BATCH_W4=${BATCH_W4:-10}; LOOP=${LOOP:-1}; DRAWS=${DRAWS:-100}; TUNE=${TUNE:-100}
  TIMEOUT_W1=${TIMEOUT_W1:-300}; TIMEOUT_W4=${TIMEOUT_W4:-300}
else
  N_W1=${N_W1:-10000,100000,1000000}; N_W4=${N_W4:-10000,100000}
  CONTESTANTS_W1=${CONTESTANTS_W1:-pymc,chees:f32,blackjax:f32,blackjax}
  CONTESTANTS_W4=${CONTESTANTS_W4:-pymc,chees:f32,blackjax:f32}
  BATCH_W1=${BATCH_W1:-250000}; BATCH_W4=${BATCH_W4:-25000}; LOOP=${LOOP:-3}; DRAWS=${DRAWS:-1000}; TUNE=${TUNE:-1000}
  TIMEOUT_W1=${TIMEOUT_W1:-300}; TIMEOUT_W4=${TIMEOUT_W4:-200}
fi
mkdir -p "$OUT"
LOG="$OUT/gpu_log.txt"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1

echo "== $(date -u +%FT%TZ) $(hostname) QUICK=$QUICK"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

# ---------------------------------------------------------------- 1. packages the image lacks
missing=$("$PY" - <<'EOF'
import importlib.util
need = {"pymc": "pymc", "pytensor": "pytensor", "blackjax": "blackjax", "arviz": "arviz",
        "hydra": "hydra-core", "omegaconf": "omegaconf"}
print(" ".join(pip for mod, pip in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "missing: $missing -> installing the carried wheels from $WHEELS into $SITE"
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "error: no wheels in $WHEELS; run 'bash benchmarks/gpu_wheels.sh' where there is internet and carry $WHEELS" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl || { echo "error: installing the wheels failed" >&2; exit 2; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" - <<'EOF' || { echo "error: the engine does not import with these packages" >&2; exit 2; }
import importlib.metadata as md
import jax
import engine, pymc, blackjax, numpyro  # noqa: F401
print("python", __import__("sys").version.split()[0], "|", ", ".join(
    f"{p} {md.version(p)}" for p in ("jax", "jaxlib", "numpyro", "blackjax", "pymc", "pytensor", "arviz", "numpy")))
print("devices:", jax.devices())
EOF

DEVICE=$("$PY" -c "import jax; print(jax.devices()[0].device_kind.replace(' ', '_'))")
BACKEND=$("$PY" -c "import jax; print(jax.default_backend())")
if [ "$QUICK" = 1 ]; then TAG=${TAG:-gpu_quick}; else TAG=${TAG:-gpu_${DEVICE}}; fi
[ "$BACKEND" = gpu ] || echo "note: JAX backend is '$BACKEND', not gpu: figures are not GPU figures"

# Let XLA take most of the GPU; the engine switches float64 on per contestant.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}

# ---------------------------------------------------------------- 2. the two workloads
status=0
run_part() {  # workload N contestants batch timeout
  echo "== $(date -u +%T) $1: N=$2, $3, chunks of $4, at most $5 s"
  timeout "$5" "$PY" -m benchmarks.throughput --workloads "$1" --n "$2" --contestants "$3" \
    --batch-size "$4" --loop-problems "$LOOP" --draws "$DRAWS" --tune "$TUNE" --repeats 1 \
    --out "$OUT" --tag "${TAG}_$1" --note "benchmarks/gpu.sh QUICK=$QUICK on $DEVICE ($BACKEND)"
  rc=$?
  if [ $rc -ne 0 ]; then
    echo "== $1 stopped with status $rc (124: its timeout); rows finished before are in $OUT/${TAG}_$1.json"
    status=1
  fi
}
run_part w1 "$N_W1" "$CONTESTANTS_W1" "$BATCH_W1" "$TIMEOUT_W1"
run_part w4 "$N_W4" "$CONTESTANTS_W4" "$BATCH_W4" "$TIMEOUT_W4"
# a part stopped by its timeout has JSON and markdown but no plot: draw them from the JSON
for part in w1 w4; do
  [ -f "$OUT/${TAG}_$part.json" ] && "$PY" -m benchmarks.report "$OUT/${TAG}_$part.json" >/dev/null 2>&1
done
echo "== $(date -u +%T) done; results in $OUT: ${TAG}_w1.{json,md} ${TAG}_w4.{json,md}, *_scaling.png, gpu_log.txt"
ls -la "$OUT" | grep -E "${TAG}|gpu_log" || true
exit $status
