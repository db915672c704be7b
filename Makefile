# Two entry points for a fresh machine (see README): `make repro` and `make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install repro test test-fast bench deps web-clip

install:
	$(PIP) install --quiet torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet -e ".[dev]"

repro: install
	dvc repro

test: install
	$(PYTHON) -m ruff check pipeline stages tests bench scripts research
	$(PYTHON) -m pytest -q

# the inner loop: everything but the end-to-end tests marked slow
test-fast: install
	$(PYTHON) -m ruff check pipeline stages tests bench scripts research
	$(PYTHON) -m pytest -q -m "not slow"

# rewrite the code deps of every stage in dvc.yaml from the imports (tests/test_dvc_deps.py checks them)
deps:
	$(PYTHON) -m pipeline.codedeps --write

bench: install
	$(PYTHON) -m bench

# build the embedded web CLIP from weights/web-clip/recipe.yaml into weights/web-clip (about 22 min on
# the 2-core CPU; docs/embedded-default-study.md, "An embedded web CLIP: first builds")
web-clip: install
	$(PYTHON) scripts/build_web_clip.py
