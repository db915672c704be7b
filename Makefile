# Two entry points for a fresh machine (see README): `make repro` and `make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install repro test bench

install:
	$(PIP) install --quiet torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet -e ".[dev]"

repro: install
	dvc repro

test: install
	$(PYTHON) -m ruff check pipeline stages tests bench scripts
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) -m bench
