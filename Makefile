# Two commands do all the set-up: `make repro` and `make test` (see README.md).
SHELL := /bin/bash
# Inside an active venv we install into it; otherwise into ./.venv.
ifdef VIRTUAL_ENV
VENV ?= $(VIRTUAL_ENV)
else
VENV ?= .venv
endif
PY := $(VENV)/bin/python
# DVC starts every stage with the first `python` on PATH, so every target that runs DVC (or the
# judge3d CLI) puts the venv first on PATH, as `. .venv/bin/activate` would.
export PATH := $(abspath $(VENV))/bin:$(PATH)
# ... and runs this checkout's code, also when the venv's editable install points at another clone.
export PYTHONPATH := $(CURDIR)/src$(if $(PYTHONPATH),:$(PYTHONPATH))
# The stamp is keyed by pyproject.toml's content (not its mtime), so a fresh clone that shares an
# installed venv (VENV=...) does not reinstall, and a changed dependency list does.
STAMP := $(VENV)/.judge3d-installed-$(shell sha256sum pyproject.toml | cut -c1-16)
EGL_DEBS := libegl1 libegl-mesa0 libgl1 libgl1-mesa-dri
BROWSER_DEBS := chromium

.PHONY: setup system-deps browser repro test verify bench report clean-venv
setup: system-deps $(STAMP)

# Headless EGL (Mesa llvmpipe) for pyrender. Installed when missing and we are root; otherwise
# a clear message naming the packages.
system-deps:
	@missing=""; for p in $(EGL_DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then echo "installing headless EGL:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "judge3d needs the Debian packages:$$missing (headless EGL for pyrender)."; \
	    echo "Run: sudo apt-get install -y$$missing   then re-run make."; exit 1; fi; fi

# Headless Chromium for the HTML-report test; best effort (the test skips with a message if absent).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BROWSER_DEBS) >/dev/null) \
	  || echo "chromium not installed: the HTML-report browser test will be skipped"; }

# dev: the test tools; trellis-cpu: spconv's CPU build and the small packages TRELLIS's model code
# imports, so the TRELLIS backend tests run on a CPU-only machine (they skip without TRELLIS source);
# serve: `judge3d serve` and the OpenAI-compatible judge client; ray: the Ray executor.
$(STAMP):
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,trellis-cpu,serve,ray]'
	@touch $(STAMP)

repro: setup
	dvc repro

# One worker per core, one test file per worker (--dist loadfile): the two end-to-end pipelines, each
# mostly one core of stage start-ups and DVC bookkeeping, run side by side. Files are handed out in
# collection order (--no-loadscope-reorder), which tests/conftest.py starts with those two pipelines.
test: setup browser
	$(VENV)/bin/pytest -q -n auto --dist loadfile --no-loadscope-reorder

verify: setup
	judge3d verify

# Speed benchmarks with in-run baselines. benchmarks/generator_sweep.py (a GPU design sweep) and
# benchmarks/pipeline_timing.py (times a whole `dvc repro`) are run by hand.
BENCHES := benchmarks/render.py benchmarks/generate.py benchmarks/judge_throughput.py
bench: setup
	@for b in $(BENCHES); do echo "== $$b"; $(PY) $$b || exit 1; done

clean-venv:
	rm -rf .venv
