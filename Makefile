# The README's two commands: `make demo` and `make test`. Both set up everything they need first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# apt waits (up to 10 min) for another apt holding the dpkg lock, instead of failing at once
APT    := $(SUDO) apt-get -o DPkg::Lock::Timeout=600

.PHONY: setup demo test lint imports redis browser checkers

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
	  $(APT) update -qq && DEBIAN_FRONTEND=noninteractive $(APT) install -y -qq redis-server; }

# Debian's chromium and its driver, for the dashboard's browser tests (tests/test_dashboard.py).
browser:
	@{ command -v chromium && command -v chromedriver; } >/dev/null || { \
	  echo "installing chromium and chromium-driver (Debian packages)"; \
	  $(APT) update -qq && DEBIAN_FRONTEND=noninteractive $(APT) install -y -qq chromium chromium-driver; }

# Debian's dicom3tools (dciodvfy checks the DICOM export) and docker-compose (checks compose.yaml), for the
# tests that use them (tests/test_dicom.py, tests/test_deploy.py).
checkers:
	@{ command -v dciodvfy && command -v docker-compose; } >/dev/null || { \
	  echo "installing dicom3tools and docker-compose (Debian packages)"; \
	  $(APT) update -qq && DEBIAN_FRONTEND=noninteractive $(APT) install -y -qq dicom3tools docker-compose; }

demo: setup
	$(BIN)/reconq demo

test: setup browser checkers
	$(BIN)/pytest -ra

lint: imports
	$(BIN)/ruff check .
	MYPYPATH=build/lint $(BIN)/mypy -p reconq

# The import layers of pyproject.toml's [tool.importlinter], checked on an installed copy: there every
# folder sits under reconq/ as in the wheel, which is the tree lint-imports (and mypy) read.
imports: setup
	rm -rf build  # setuptools would pack stale files left in build/lib
	$(BIN)/pip install --quiet --no-deps --no-build-isolation --target build/lint .
	cd build/lint && $(CURDIR)/$(BIN)/lint-imports --no-cache $(CURDIR)/pyproject.toml
