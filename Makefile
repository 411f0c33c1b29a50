# The two commands README.md names: `make run` (set up + the main job) and `make test`.
VENV := .venv
SPL := $(VENV)/bin/spl
PY := $(VENV)/bin/python

.PHONY: setup run test test-gpu lint

$(VENV)/.setup-done: pyproject.toml constraints.txt scripts/setup.sh
	./scripts/setup.sh
	touch $@

setup: $(VENV)/.setup-done

# The main job: ask the embedded default model one question through a local spl server
# (started in the background if none of yours is running; `spl server stop` stops it).
# Its port: `make run SPL_PORT=9000` (make passes it on as $SPL_PORT), else [server] port in
# ~/.config/spl/config.toml, else 8787 (or a free one if 8787 belongs to someone else). The
# port is remembered in the state dir, so later `spl` commands and `make run` use that server.
run: setup
	$(SPL) chat --temp 0 --once "What is the capital of France?"

test: setup
	$(PY) -m pytest -q -m "not gpu"

# On a CUDA machine (carry .whl and .gpu: scripts/gpu_wheels.sh): every GPU test file, in the
# normal order; `make test-gpu ORDER="reverse memcheck"` for others (scripts/gpu_suite.sh).
ORDER ?= normal
test-gpu:
	bash scripts/gpu_suite.sh $(ORDER)

lint: setup
	$(VENV)/bin/ruff check core plugins cli tests
