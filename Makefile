# Two entry points for a fresh machine: `make run` (demo audit) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: run test test-slow test-all bench bench-quick bench-certified gpu-wheels clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

# benchmarks also need nutpie (the per-problem peer): the `nutpie` extra
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[test,nutpie]"
	touch $(BENCH_STAMP)

run: $(STAMP)
	$(BIN)/python -m engine $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q -n 2 --dist loadfile $(ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow -q -n 2 --dist loadfile $(ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

bench: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.throughput $(ARGS)

bench-quick: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.throughput --quick $(ARGS)

# time to a certified posterior: engine samplers vs a nutpie loop vs pm.sample
bench-certified: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.certified $(ARGS)

# Python 3.12 wheels for benchmarks/gpu.sh on a machine without internet (into .whl/, git-ignored)
gpu-wheels:
	bash benchmarks/gpu_wheels.sh

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
