# The two commands of the README's quick start. Both create .venv on first use and reuse it.
#   make demo   set up, then train on the embedded default dataset (CPU, < 10 min) and report
#   make test   set up, then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.semijax-installed

.PHONY: demo test setup clean-venv results

setup: $(STAMP)

# Reinstall when the dependencies change. constraints.txt pins the versions the suite ran on.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

# Regenerates the README results and ablation tables (24 + 7 training runs; finished runs under
# runs/ are read back, so an interrupted `make results` continues). About 4 hours on 2 cores.
results: $(STAMP)
	$(PY) -m experiments.benchmarks.embedded_results --out=results/embedded.json --readme=README.md
	$(PY) -m experiments.benchmarks.ablations --out=results/ablations.json --readme=README.md

clean-venv:
	rm -rf $(VENV)
