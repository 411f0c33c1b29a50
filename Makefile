# The two commands README.md names: `make run` (set up + the main job) and `make test`.
VENV := .venv
SPL := $(VENV)/bin/spl
PY := $(VENV)/bin/python

.PHONY: setup run test test-gpu lint

$(VENV)/.setup-done: pyproject.toml scripts/setup.sh
	./scripts/setup.sh
	touch $@

setup: $(VENV)/.setup-done

# The main job: ask the embedded default model one question through a local spl server
# (started in the background if none is running; `spl server stop` stops it).
run: setup
	$(SPL) chat --temp 0 --once "What is the capital of France?"

test: setup
	$(PY) -m pytest -q -m "not gpu"

test-gpu:
	python3 -m pytest -q -m gpu tests

lint: setup
	$(VENV)/bin/ruff check core plugins cli tests
