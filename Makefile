# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run demo test test-torch smoke reliability reliability-load reliability-faults reliability-report bench \
	bench-serve bench-precision clean

$(BIN)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

# The API under gunicorn, a Celery training worker, a Celery ingest worker (dataset uploads) and the
# job reconciler, together (Procfile); Ctrl-C stops all four. Without CELERY_BROKER_URL the workers use
# an embedded broker (files under DATA_DIR), so no Redis is needed.
run: $(BIN)/.installed
	HOST=$(HOST) $(BIN)/honcho start -f Procfile --port $(PORT)

# The demo: make the sample dataset, train a model on it and show predictions.
demo: $(BIN)/.installed
	$(BIN)/python -m training demo

test: $(BIN)/.installed
	$(BIN)/ruff check .
	BACKBONE_WEIGHTS=none $(BIN)/python -m pytest -m "not long" $(PYTEST_ARGS)

# The training library under Keras' PyTorch backend (the GPU hosts have PyTorch and JAX, not
# TensorFlow). TORCH names the CPU build: on this project's machines pip finds torch 2.13.0 locally.
TORCH ?= torch==2.13.0
test-torch: $(BIN)/.installed
	$(BIN)/python -c 'import torch' 2>/dev/null || $(BIN)/pip install --quiet $(TORCH)
	KERAS_BACKEND=torch BACKBONE_WEIGHTS=none $(BIN)/python -m pytest tests/training $(PYTEST_ARGS)

# The container smoke test (a step of .ci/run): the CPU image built with podman, the compose stack on
# 127.0.0.1 (ports 8091, 6391, 5439, 5591), a tiny training job and a prediction through the API. As root.
smoke: $(BIN)/.installed
	bash deploy/smoke.sh

# Issue 7's long runs, left out of `make test` (each its own step of .ci/run): load under locust, the
# live-stack faults, then the report of what they and make test's hostile-input run recorded.
reliability: reliability-load reliability-faults reliability-report

reliability-load: $(BIN)/.installed
	BACKBONE_WEIGHTS=none $(BIN)/python -m pytest -m long tests/reliability/test_load.py $(PYTEST_ARGS)

reliability-faults: $(BIN)/.installed
	BACKBONE_WEIGHTS=none $(BIN)/python -m pytest -m long tests/reliability/test_faults.py $(PYTEST_ARGS)

reliability-report: $(BIN)/.installed
	$(BIN)/python -m bench.reliability --require bad_inputs,load,faults

bench: $(BIN)/.installed
	BACKBONE_WEIGHTS=none $(BIN)/python bench/train_speed.py

bench-serve: $(BIN)/.installed
	BACKBONE_WEIGHTS=none $(BIN)/python bench/serve_throughput.py

# Heads trained in float32 and bfloat16, each served in both: top-1 agreement and accuracy.
bench-precision: $(BIN)/.installed
	BACKBONE_WEIGHTS=none $(BIN)/python bench/precision.py

clean:
	rm -rf $(VENV) data .pytest_cache .ruff_cache
