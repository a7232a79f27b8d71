# The README's two commands: `make demo` and `make test`. Both set up everything they need first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test lint redis browser

setup: $(VENV)/.installed redis

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Debian's redis-server, for the private Redis that `reconq up`/`demo` and the tests start.
redis:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (Debian package)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server; }

# Debian's chromium and its driver, for the dashboard's browser tests (tests/test_dashboard.py).
browser:
	@{ command -v chromium && command -v chromedriver; } >/dev/null || { \
	  echo "installing chromium and chromium-driver (Debian packages)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver; }

demo: setup
	$(BIN)/reconq demo

test: setup browser
	$(BIN)/pytest -ra

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy gateway workers recon scheduler parametermaps reconq
