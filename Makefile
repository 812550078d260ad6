# The two commands of the README's quick start. Both create .venv on first use and reuse it.
#   make demo   set up, then train on the embedded default dataset (CPU, < 10 min) and report
#   make test   set up, then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.semijax-installed

.PHONY: demo test test-fast test-torch lint setup clean-venv results regime ablations tensorboard gpu-wheels

setup: $(STAMP)

# Reinstall when the dependencies change. constraints.txt pins the versions the suite ran on.
# The `dev` extra holds what `make demo` needs (the `demo` extra: embedded dataset, TensorBoard
# event writer), the other extras the tests exercise, pytest and ruff (pyproject.toml).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

# Unit tests only (no training, no compiled train steps, no benchmark scripts, no README runs);
# 2 min 38 s on 2 cores with a warm compilation cache, 6 min cold (BUILD_NOTES, Known gaps).
test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

# The style checks of pyproject.toml [tool.ruff] (run by .ci/run before the tests).
lint: $(STAMP)
	$(PY) -m ruff check semijax experiments tests

# The torch-parity tests (tests/models/test_torch_parity.py) need torch, an optional extra.
test-torch: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[torch]'
	$(PY) -m pytest -q tests/models/test_torch_parity.py

# Regenerates the README headline table (methods x 1/16, 1/8 x 3 seeds, plus the full-label
# supervised ceiling) and its figures. Two grid processes share the 2 cores (1 h 47 min measured,
# BUILD_NOTES "Embedded benchmark in the pretrained regime"); finished runs under
# runs/embedded_results are read back, so an interrupted `make results` continues. More methods:
# RESULTS_B=mean_teacher,dgcl,alonso,csc,cac and the same in RESULTS_METHODS (the table's rows).
RESULTS_METHODS ?= supervised,mean_teacher,dgcl,dssn
RESULTS_A ?= supervised,dssn
RESULTS_B ?= mean_teacher,dgcl
results: $(STAMP)
	$(PY) -m experiments.benchmarks.embedded_results --methods=$(RESULTS_A) --extra=full \
	  --out=runs/embedded_results/part_a.json & a=$$!; \
	$(PY) -m experiments.benchmarks.embedded_results --methods=$(RESULTS_B) \
	  --out=runs/embedded_results/part_b.json & b=$$!; \
	wait $$a && wait $$b
	$(PY) -m experiments.benchmarks.embedded_results --methods=$(RESULTS_METHODS) \
	  --extra=full --only_finished --out=results/embedded.json --readme=README.md
	$(PY) -m experiments.benchmarks.figures --results=results/embedded.json \
	  --runs=runs/embedded_results --out=results/figures

# How the gain depends on the regime (start x schedule, supervised vs mean teacher, 1/16).
regime: $(STAMP)
	$(PY) -m experiments.benchmarks.regime --out=results/regime.json --readme=README.md

# The single-seed ablations of every method (README "Ablations").
ablations: $(STAMP)
	$(PY) -m experiments.benchmarks.ablations --out=results/ablations.json --readme=README.md

# TensorBoard for the logs every run writes (runs/<name>/tensorboard): the viewer only, no
# TensorFlow. Then: $(VENV)/bin/tensorboard --logdir runs
tensorboard: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[tensorboard]'
	@echo "installed; view a run with: $(VENV)/bin/tensorboard --logdir runs"

# The pure-Python / cp312 wheels the GPU machine lacks (it cannot download), for
# experiments/benchmarks/gpu_run.sh: fetch them here, then carry the folder to the machine.
GPU_WHEELS := experiments/benchmarks/wheels-py312
gpu-wheels:
	mkdir -p $(GPU_WHEELS)
	$(PY) -m pip download -q --disable-pip-version-check --python-version 3.12 \
	  --only-binary=:all: --no-deps -d $(GPU_WHEELS) -c constraints.txt \
	  ml-collections pyyaml grain array-record dm-tree etils cloudpickle more-itertools \
	  tensorboardX protobuf

clean-venv:
	rm -rf $(VENV)
