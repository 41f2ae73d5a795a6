# adpfl_jax — `make demo` and `make test` work on a fresh machine with python3 (>= 3.11) and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu
SMOKE ?=
SEEDS ?= 0 1 2

.PHONY: install demo test lint bench compare paper-table sweep audit frontier clean help

help:
	@echo "make demo | test | install | lint | bench | compare | paper-table | sweep | audit | frontier | clean"

$(STAMP): setup.cfg pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "python >= 3.11 needed"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,audit]'
	@touch $(STAMP)

install: $(STAMP)

demo: install
	rm -rf runs/demo
	$(BIN)/adpfl train --config=experiments/quickstart.py --workdir=runs/demo

test: install
	$(TEST_ENV) $(BIN)/python -m pytest tests

lint: install
	$(BIN)/ruff check adpfl_jax tests benchmarks experiments

bench: install
	$(BIN)/python benchmarks/round_throughput.py

compare: install
	$(BIN)/python experiments/compare.py --out runs/compare --seeds $(SEEDS) $(if $(SMOKE),--smoke,)

sweep: install
	$(BIN)/python experiments/sweep.py --out runs/sweep $(if $(SMOKE),--smoke,) $(ARGS)

audit: install
	$(BIN)/python experiments/audit.py --out runs/audit $(if $(SMOKE),--smoke,)

# Technique ablation at ε = 1 (+ Dice vs ε, KiTS23/BraTS rows); SMOKE=1: seed 0, small, minutes.
frontier: install
	$(BIN)/python experiments/frontier.py --out runs/frontier $(if $(SMOKE),--smoke,--seeds $(SEEDS))

# SMOKE=1 runs seed 0 unless SEEDS is given (`make paper-table SMOKE=1 SEEDS="0 1 2"`).
paper-table: install
	$(BIN)/python experiments/paper/run.py --out runs/paper $(if $(SMOKE),--smoke --seeds $(if $(filter file,$(origin SEEDS)),0,$(SEEDS)),--seeds $(SEEDS)) $(if $(DATA_DIR),--data-dir $(DATA_DIR),)

clean:
	rm -rf runs .pytest_cache
