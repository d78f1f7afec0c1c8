# Every target sets itself up: a fresh clone needs only `make train` or `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
ARGS ?=
DEST ?=

.PHONY: help install train test test-all lint format weights embed-data bench gpu-check matrix matrix-real crossover notebook new clean test-browser

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)  ## create .venv and install the project with its dev extras

train: $(STAMP)  ## the default job: small_similar, embedded MobileNetV2 + hymenoptera (ARGS="case=... ...")
	$(BIN)/transfer-train $(ARGS)

# Tests run in parallel (pytest-xdist), one torch thread per worker: two single-threaded workers beat
# one two-threaded process on small tensors, and never oversubscribe the cores. worksteal: an idle worker
# takes tests queued on the busy one, so a long test near the end does not leave a core idle.
PYTEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist worksteal

test: $(STAMP)  ## the fast test suite (a few minutes)
	$(PYTEST) $(ARGS)

test-all: $(STAMP)  ## fast and slow tests
	$(PYTEST) -m "slow or not slow" $(ARGS)

# The reports in headless Chromium (Playwright). The browser: the system's (apt-get install chromium) or
# Playwright's own ($(BIN)/playwright install chromium); the test skips, saying which, without one.
test-browser: $(STAMP)  ## open each kind of report.html in headless Chromium (needs the browser extra)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[browser]"
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:xdist -m slow tests/test_report_html_browser.py $(ARGS)

# The commands of docs/scale_out.md as written, on localhost: two torchrun agents as two nodes, and srun
# (a stand-in with SLURM's variables), gloo, one CPU process each; a head-only and a fine-tuning case.
two-nodes: $(STAMP)  ## two "nodes" on localhost (torchrun, srun): one run folder, the cache shared out, one process's metrics
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:xdist -m slow tests/test_scale_out.py -k two_nodes $(ARGS)

lint: $(STAMP)  ## ruff lint and format check
	$(BIN)/ruff check src tests bench studies scripts
	$(BIN)/ruff format --check src tests bench studies scripts

format: $(STAMP)  ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix src tests bench studies scripts
	$(BIN)/ruff format src tests bench studies scripts

weights: $(STAMP)  ## rebuild the embedded MobileNetV2 from the TF-Lite file in ../shared/data
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[convert]"
	$(BIN)/python -m transfer_cases.convert.tflite_mobilenet

embed-data: $(STAMP)  ## rebuild the embedded hymenoptera copy from ../shared/data
	$(BIN)/python -m transfer_cases.tools.embed_data ../shared/data/hymenoptera_data

matrix: $(STAMP)  ## the four cases on the embedded default (Hydra multirun); report in notebooks/results/
	rm -rf outputs/matrix
	$(BIN)/transfer-train -m case=small_similar,small_different,large_similar,large_different \
		callbacks.progress_bar.refresh_rate=0 hydra.sweep.dir=outputs/matrix $(ARGS)
	$(BIN)/transfer-report outputs/matrix --out notebooks/results

matrix-real: $(STAMP)  ## the 2x2 on real data (CIFAR-10, MNIST; small and large; 4 cases + auto, LP-FT); long, resumable
	$(BIN)/python -m studies.matrix_real $(ARGS)

crossover: $(STAMP)  ## where fine-tuning starts to pay: gain vs N per data set (issue 23); long, resumable
	$(BIN)/python -m studies.crossover $(ARGS)

# `jupyter execute` (nbclient, in the dev extras) starts the kernel in notebooks/; the notebook puts a
# relative OUTPUT_DIR under the project root, so logs, figures and results.json land in outputs/notebook/
# with the executed copy. JUPYTER_PREFER_ENV_PATH: this environment's python3 kernel before a user one.
notebook: $(STAMP)  ## run notebooks/01_four_cases.ipynb headless; results and executed copy in outputs/notebook/
	@mkdir -p outputs/notebook
	JUPYTER_PREFER_ENV_PATH=1 $(BIN)/jupyter execute --output="$(CURDIR)/outputs/notebook/01_four_cases" \
		notebooks/01_four_cases.ipynb $(ARGS)

# Each script writes its own results file (bench/results*.md); ARGS go to bench/bench.py.
bench: $(STAMP)  ## measure the template's costs side by side; writes bench/results*.{md,json} (long)
	$(BIN)/python bench/bench.py $(ARGS)
	$(BIN)/python bench/sweeps.py
	$(BIN)/python bench/scale_out.py $(filter --quick,$(ARGS))

gpu-check: $(STAMP)  ## one epoch per case in 16-mixed and bf16-mixed, channels_last, on a CUDA GPU
	$(BIN)/python -m transfer_cases.tools.gpu_check $(ARGS)

# ARGS go to copier: ARGS="--defaults -d data_path=/data/cats" answers without a terminal (scripts, CI).
new: $(STAMP)  ## a new project for a new task from this repository (DEST=../my-task [ARGS="--defaults -d ..."])
	@test -n "$(DEST)" || { echo 'usage: make new DEST=../my-task [ARGS="--defaults -d data_path=/data/cats"]'; exit 2; }
	$(BIN)/copier copy --trust --vcs-ref HEAD $(ARGS) . "$(DEST)"

clean:  ## remove run outputs and caches (keeps .venv)
	rm -rf outputs .pytest_cache .ruff_cache
