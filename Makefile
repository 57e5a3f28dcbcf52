# The README's commands. Every target creates/refreshes the virtual environment first.
PYTHON     ?= python3
VENV       ?= .venv
BIN        := $(VENV)/bin
# torch + torchvision pair: on the project's CPU machines this is the only pair that imports together
# (a CUDA build that also runs on the CPU); users with CUDA get the same normal wheels from PyPI.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# Where the datasets live (mnist/, cifar10/, imdb/, multi30k/): data/, filled by `make data`.
DATA_DIR   ?= $(or $(DISTBENCH_DATA_DIR),data)
RUNS_DIR   ?= runs
PROFILE    ?= auto
PYTEST_ARGS ?=
# Debian's Chromium, driven by Playwright in the dashboard's browser test (Playwright downloads no browser).
CHROMIUM   ?= /usr/bin/chromium
export CHROMIUM

.PHONY: venv test bench-all bench-quality bench-strategies bench-speed dashboard lint format clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

test: venv
	DISTBENCH_DATA_DIR=$(DATA_DIR) $(BIN)/python -m pytest -q --durations=15 $(PYTEST_ARGS)

# the fast tier while editing: everything but real launches and the browser (marked slow), about a minute
.PHONY: test-fast
test-fast: venv
	DISTBENCH_DATA_DIR=$(DATA_DIR) $(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# the dashboard screenshots in docs/screenshots/ (the browser test, writing its screenshots there)
.PHONY: screenshots
screenshots: venv browser
	DISTBENCH_SCREENSHOTS=docs/screenshots DISTBENCH_DATA_DIR=$(DATA_DIR) $(BIN)/python -m pytest -q tests/test_dashboard_e2e.py

# every GPU check in one command (<= 8 min on one GPU; docs/gpu.md); without CUDA: one line, exit 2.
# Runs with the venv's python if there is one, else python3 (a lent GPU machine brings its own torch).
.PHONY: gpu-check gpu-check-prepare
# what must travel to a borrowed GPU machine (data/ with MNIST, IMDB, Multi30k; no wheels needed): prints the
# device tool's carry list and the one command (docs/gpu.md)
gpu-check-prepare: venv
	$(BIN)/python -m bench.gpu_prepare --data_dir $(DATA_DIR)

gpu-check:
	$(or $(wildcard $(BIN)/python),python3) -m bench.gpu_check --data_dir $(if $(wildcard data/mnist),data,$(DATA_DIR)) --out $(or $(OUT),gpu_check)

# the four datasets in DATA_DIR, verified (counts, readable files); missing ones downloaded from the Hugging
# Face hub first. ONLY="mnist imdb" for some of them.
.PHONY: data
data: venv
	$(BIN)/python -m bench.data --data_dir $(DATA_DIR) $(if $(ONLY),--only $(ONLY))

# every script for a few steps (presets/debug/) on 1 and on 2 processes, launched as a user would; synthetic
# data unless SMOKE_ARGS="--data local --data_dir ..." : does everything still run end to end?
.PHONY: smoke
smoke: venv
	$(BIN)/python -m bench.smoke $(SMOKE_ARGS)

# The dashboard's browser test needs Chromium: installed with apt-get when missing (as root); otherwise that
# test skips, and fails under CI (CI=true).
.PHONY: browser
test: browser
browser:
	@test -x $(CHROMIUM) || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && apt-get update -qq \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
		|| echo "note: no $(CHROMIUM) and apt-get install chromium not possible here: the dashboard browser test will skip"

# RESUME=<batch> continues a stopped matrix (Ctrl-C, crash), running only the cells that did not finish
bench-all: venv
	$(BIN)/python -m bench.run --matrix bench/matrix.yaml --profile $(PROFILE) --data_dir $(DATA_DIR) \
		--runs_dir $(RUNS_DIR) $(if $(RESUME),--resume $(RESUME)) $(if $(MODELS),--models $(MODELS))

# K quick benches back to back (default 3, ~12 min each here): per cell, how often two benches' speedup
# intervals overlap and their verdicts agree (bench/coverage.py); COVERAGE_OUT=<folder> for its record
K ?= 3
.PHONY: bench-coverage
bench-coverage: venv
	$(BIN)/python -m bench.coverage --k $(K) --data_dir $(DATA_DIR) --runs_dir $(RUNS_DIR) \
		$(if $(COVERAGE_OUT),--out $(COVERAGE_OUT))

# how fast the dashboard answers: its script run cold and a warm rerun, per runs folder (bench/dashboard_speed.py)
DASHBOARD_DIRS ?= $(RUNS_DIR) docs/results
.PHONY: bench-dashboard
bench-dashboard: venv
	$(BIN)/python -m bench.dashboard_speed $(DASHBOARD_DIRS)

bench-quality: venv
	$(BIN)/python -m bench.run --matrix bench/quality.yaml --profile full --data_dir $(DATA_DIR) --runs_dir $(RUNS_DIR)

bench-strategies: venv
	$(BIN)/python -m bench.run --matrix bench/strategies.yaml --profile strategies --data_dir $(DATA_DIR) \
		--runs_dir $(RUNS_DIR) $(if $(RESUME),--resume $(RESUME))

# a new training script scripts/$(NAME).py (or DEST=path/x.py) from scripts/mlp.py with the parts to replace
# marked, then its smoke test
.PHONY: new-model
new-model: venv
	$(BIN)/python -m bench.new_model --name "$(NAME)" $(if $(DEST),--dest "$(DEST)") --data_dir $(DATA_DIR)

# the project's training step vs a study-style loop, same process and device (CPU: 10 steps; CUDA: an epoch)
bench-speed: venv
	$(BIN)/python -m bench.speed --data_dir $(DATA_DIR) --runs_dir $(RUNS_DIR) $(SPEED_ARGS)

# Will N devices pay off? Profiles this machine once (cached in $(RUNS_DIR)/profiles/), then projects every model
# and strategy at N = 1, 2, 4, 8 (docs/projection.md). PROJECT_ARGS="--hardware t4-pcie --model cnn --devices 1,2"
.PHONY: project project-validate
project: venv
	$(BIN)/python -m bench.project --data_dir $(DATA_DIR) --runs_dir $(RUNS_DIR) $(PROJECT_ARGS)

# the same, plus the real multi-process runs of bench-strategies now, each compared with its prediction
project-validate: venv
	$(BIN)/python -m bench.project --data_dir $(DATA_DIR) --runs_dir $(RUNS_DIR) --validate $(PROJECT_ARGS)

# the modelled GPU compute against GPU figures that exist: published scaling tables and the study's T4 runs
# (docs/projection.md#validation-on-gpu-figures-that-exist); 10 minutes on this 2-core machine (2026-12-07)
.PHONY: gpu-validate
gpu-validate: venv
	$(BIN)/python -m bench.gpu_validation --data_dir $(DATA_DIR) --out $(RUNS_DIR)/gpu-validation

# the result tables of README.md and docs/speed.md, from the clean records listed in docs/results/report.yaml
.PHONY: report
report: venv
	$(BIN)/python -m bench.report

dashboard: venv
	RUNS_DIR=$(RUNS_DIR) $(BIN)/streamlit run dashboard.py --server.headless true --server.address 127.0.0.1 \
		--server.port $(or $(PORT),8501) --browser.gatherUsageStats false

lint: venv
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache
