#!/usr/bin/env bash
# Fill a folder with the wheels benchmarks/gpu.sh installs on a machine without internet whose
# image has Python 3.12, JAX (with its CUDA plugin), NumPyro, NumPy, SciPy, pandas, xarray,
# matplotlib, numba, optax, rich, psutil and pyarrow, but not PyMC, PyTensor, BlackJAX, ArviZ or
# hydra-core. Run it HERE (with internet), then carry the folder (it is git-ignored):
#
#   bash benchmarks/gpu_wheels.sh            # -> .whl/ (about 10 MB)
#   WHEELS=/some/dir bash benchmarks/gpu_wheels.sh
#
# Versions are the ones pyproject.toml's environment was tested with. Only the missing packages
# are fetched (--no-deps), so the image's JAX, NumPy etc. are kept. antlr4-python3-runtime 4.9.3
# (hydra-core's parser) is published as a source archive only; it is pure Python, so it is built
# into a py3-none-any wheel here.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${WHEELS:-.whl}
PY=${PY:-python3}
PYVER=${PYVER:-3.12}

BINARY=(
  pymc==5.28.5 pytensor==2.38.3 arviz==0.23.4 blackjax==1.7.1 hydra-core==1.3.8 omegaconf==2.3.1
  cachetools==6.2.6 etuples==0.3.10 cons==0.4.7 logical-unification==0.4.7 miniKanren==1.0.5
  xarray-einstats==0.9.1 h5netcdf==1.8.3 platformdirs==4.14.9
)
SDIST_PURE=(antlr4-python3-runtime==4.9.3)

mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${BINARY[@]}"
"$PY" -m pip wheel -q --no-deps -w "$DEST" "${SDIST_PURE[@]}"
ls -1 "$DEST"
du -sh "$DEST"
