# The two commands a newcomer types: `make demo` and `make test`.
# Each installs what is missing (a .venv with torch from the package registry, the
# Debian Fashion-MNIST package) and is fast when everything is already there.

VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.reparq-installed
FMNIST  := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
GITDOC  := /usr/share/doc/git-doc/user-manual.html
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# torch/torchvision pinned to the release the registry serves for this platform (timm needs torchvision).
TORCH   ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install data bench zoo clean

demo: install data
	$(VENV)/bin/reparq demo

test: install data
	$(PY) -m pytest -q

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

data: $(FMNIST) $(GITDOC)

$(FMNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

# English text (Git's manual in HTML) for the MiniLM and LLaMA benchmarks.
$(GITDOC):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq git-doc

bench: install data
	$(PY) benchmarks/ptq_baselines.py

zoo: install data
	$(VENV)/bin/reparq zoo train --all

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info src/*.egg-info
