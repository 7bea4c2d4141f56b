# The README's commands. Each target first runs the (idempotent) set-up, so a fresh clone needs
# nothing else: `make demo` trains and evaluates the demo model, `make test` runs the tests.
PY := .venv/bin/python
SRC := rankdetr tools tests configs setup.py

.PHONY: setup demo test lint format gpu-check

setup:
	@bash tools/setup_env.sh

demo: setup
	$(PY) tools/train_net.py --config-file configs/demo/rank_detr_r18_shapes.py

# One pytest-xdist worker per core (tests/conftest.py gives each its share of the threads); a file
# is one unit of work, handed out slowest-first. PYTEST_XDIST= runs in one process.
PYTEST_XDIST ?= -n auto --dist loadfile --no-loadscope-reorder

test: setup
	$(PY) -m pytest $(PYTEST_XDIST) $(PYTEST_ARGS)

gpu-check: setup
	$(PY) tools/gpu_selftest.py

lint: setup
	$(PY) -m ruff check $(SRC)
	$(PY) -m black --check $(SRC)
	$(PY) -m isort --check-only $(SRC)

format: setup
	$(PY) -m isort $(SRC)
	$(PY) -m black $(SRC)
	$(PY) -m ruff check --fix $(SRC)
