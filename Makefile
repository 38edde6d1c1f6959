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
# TIERS: a marker expression that narrows every part, e.g. 'not integration and not cluster and not slurm'
# (a -m in PYTEST_ARGS would replace the parts' own -m: the serial tests would run twice)
TIERS ?=

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

# The unit tier runs on every core (pytest-xdist: its tests are independent, each in its own tmp dir).
# The tiers with Ray clusters, Slurm jobs and 2-process groups run two at a time: a third to half of
# such a test's wall time the CPUs sit idle (Ray and Slurm start-up, polling, injected hangs), which the
# other fills. `--dist loadfile` keeps a file's tests on one worker, one at a time: the 2-node Ray
# cluster of tests/cluster and the Slurm jobs of tests/slurm/test_slurm.py are one per module (xdist's
# `loadgroup` would be finer, but its groups are lost under pytest 9.2: it renames items by `_nodeid`).
# The tests marked `serial` (wall-time bounds, timed kills) run alone at the end. All three always run; the target
# fails if any failed.
test: lint
	$(BIN)/pytest -n auto tests/unit $(if $(TIERS),-m "$(TIERS)") $(PYTEST_ARGS); unit=$$?; \
	$(BIN)/pytest -n 2 --dist loadfile -m "not serial$(if $(TIERS), and ($(TIERS)))" --ignore=tests/unit \
		$(PYTEST_ARGS); rest=$$?; \
	$(BIN)/pytest -m "serial$(if $(TIERS), and ($(TIERS)))" --ignore=tests/unit $(PYTEST_ARGS); serial=$$?; \
	for code in $$unit $$rest $$serial; do test $$code -eq 0 || test $$code -eq 5 || exit 1; done  # 5: TIERS left none

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf runs .pytest_cache .ruff_cache
