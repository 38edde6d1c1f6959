# Every target creates/updates the virtualenv it needs, so `make smoke` / `make test` work on a fresh
# machine. On a machine without CUDA we install the CPU build of torch first (TORCH_SPEC): once it is
# there, `torch>=2.6` in pyproject.toml is satisfied and pip does not pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP := $(VENV)/bin/pip
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# --durations: the slowest tests in the CI log (the suite has a time budget, see README's Tests)
PYTEST_ARGS ?= --durations=40

.PHONY: install smoke test lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q "$(TORCH_SPEC)"; fi
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

# The README's first command: real digits -> shards -> 2 Ray workers, DeepSpeed ZeRO-2, bf16.
smoke: $(STAMP)
	test -f data/digits/MANIFEST.json || $(BIN)/pipeline data prepare digits --out data/digits
	rm -rf runs/smoke  # the smoke run's own scratch dir: every `make smoke` trains from scratch
	$(BIN)/pipeline train configs/smoke.yaml

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# The unit tier runs on every core (pytest-xdist: its tests are independent, each in its own tmp dir);
# the tiers with Ray clusters, Slurm jobs and 2-process groups run one test at a time (each uses every
# core itself, and their timeouts assume it). Both always run; the target fails if either failed.
test: lint
	$(BIN)/pytest -n auto tests/unit $(PYTEST_ARGS); unit=$$?; \
	$(BIN)/pytest --ignore=tests/unit $(PYTEST_ARGS); rest=$$?; \
	test $$unit -eq 0 && test $$rest -eq 0

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf runs .pytest_cache .ruff_cache
