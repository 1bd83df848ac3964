# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run demo test lint bench clean

$(BIN)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

# The prediction service under gunicorn (gunicorn.conf.py reads HOST, PORT, WEB_CONCURRENCY,
# THREADS and the other settings from the environment).
run: $(BIN)/.installed
	HOST=$(HOST) PORT=$(PORT) $(BIN)/gunicorn -c gunicorn.conf.py wsgi:app

# The demo: make the sample dataset, train a model on it and show predictions.
demo: $(BIN)/.installed
	$(BIN)/python -m training demo

test: $(BIN)/.installed
	$(BIN)/ruff check .
	BACKBONE_WEIGHTS=none $(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(BIN)/.installed
	BACKBONE_WEIGHTS=none $(BIN)/python bench/train_speed.py

clean:
	rm -rf $(VENV) data .pytest_cache .ruff_cache
