# The two commands of the contract: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= configs/cpu.toml
DEMO   ?= demo

.PHONY: install test test-fast typecheck demo benchmarks clean-demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch and torchvision are pinned here: these releases install from local wheels on
	# CPU-only machines; any other version pulls multi-GB downloads.
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install typecheck
	$(PY) -m pytest -q -rfEs

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# mypy over the package (found through .typecheck/, see docs/ARCHITECTURE.md) and the benchmarks.
typecheck: install
	$(PY) -m mypy
	$(PY) -m mypy --explicit-package-bases benchmarks

$(DEMO)/data/train_concepts.csv: | install
	$(PY) cli.py make-demo $(DEMO)/data

demo: install $(DEMO)/data/train_concepts.csv
	$(PY) cli.py train-all --data $(DEMO)/data --out $(DEMO)/run --config $(CONFIG)
	$(PY) cli.py predict --run $(DEMO)/run --images $(DEMO)/data/test --out $(DEMO)/submission.tsv
	$(PY) cli.py validate $(DEMO)/submission.tsv --images $(DEMO)/data/test
	$(PY) cli.py evaluate $(DEMO)/submission.tsv $(DEMO)/data/test_concepts.csv --categories $(DEMO)/data/test_categories.csv
	$(PY) cli.py ablation --run $(DEMO)/run --images $(DEMO)/data/test --gt $(DEMO)/data/test_concepts.csv \
		--categories $(DEMO)/data/test_categories.csv --out $(DEMO)/ablation

benchmarks: install
	$(PY) benchmarks/cache_throughput.py
	$(PY) benchmarks/postprocess_scale.py
	$(PY) benchmarks/inference_overhead.py
	$(PY) benchmarks/demo_ceiling.py $(DEMO)/data

clean-demo:
	rm -rf $(DEMO)
