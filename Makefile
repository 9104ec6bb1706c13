# raylens: two commands on a fresh machine.
#   make demo   install, prepare Fashion-MNIST locally, fine-tune the CPU default on local Ray
#   make test   install (with test extras), then run the whole test suite (what CI runs)
#   make test-fast  the unit tests only: no storage server, no Ray (about a minute)
# Each target installs what it needs into .venv (Python 3.10+ with venv required).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test test-fast install lint data clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

# Fashion-MNIST from the Debian package when apt is usable; otherwise jobs.prepare
# downloads the official files (checksum verified) on first use.
data:
	@if [ ! -d $(FMNIST) ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	fi

demo: install data
	$(PY) -m jobs.prepare --config jobs/configs/fashion_mnist.yaml
	$(PY) -m jobs.finetune --config jobs/configs/fashion_mnist.yaml

test: install data
	$(PY) -m pytest -q --durations=15

# Tests that need a server or Ray are marked `slow` by tests/conftest.py.
test-fast: install
	$(PY) -m pytest -q -m "not slow" --durations=10

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) data runs
