# t2i-curate: `make demo` and `make test` are the two entry points; both call `make setup`.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
HF_VENV := .venv-hf
HF_STAMP := $(HF_VENV)/.setup-stamp
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.setup-stamp
TOOLS_VENV := .venv-tools
TOOLS_STAMP := $(TOOLS_VENV)/.setup-stamp
PIP_QUIET := 2>&1 | { grep -vE "^WARNING: Location .* is ignored" || true; }
BROWSER := /usr/bin/chromium
CJK_PACKAGES := fonts-noto-cjk fonts-noto-cjk-extra fonts-wqy-zenhei fonts-arphic-ukai fonts-arphic-uming
CJK_FONTS := /usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc /usr/share/fonts/opentype/noto/NotoSansCJK-Light.ttc \
	/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc /usr/share/fonts/truetype/arphic/ukai.ttc \
	/usr/share/fonts/truetype/arphic/uming.ttc
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

export PREFECT_SERVER_ANALYTICS_ENABLED := false
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test lint bench bench-quick lock clean

setup: $(STAMP) $(HF_STAMP) $(TOOLS_STAMP)

# Label Studio in a venv of its own (its Django pins clash with ours): the grading round trip test starts it.
$(TOOLS_STAMP): requirements-tools.txt
	test -x $(TOOLS_VENV)/bin/python || $(PY) -m venv $(TOOLS_VENV)
	set -o pipefail; $(TOOLS_VENV)/bin/pip install -q -r requirements-tools.txt $(PIP_QUIET)
	touch $(TOOLS_STAMP)

# Hugging Face datasets in a venv of its own (its pyarrow/numpy clash with ours): loads outputs in tests.
$(HF_STAMP): requirements-hf.txt
	test -x $(HF_VENV)/bin/python || $(PY) -m venv $(HF_VENV)
	set -o pipefail; $(HF_VENV)/bin/pip install -q -r requirements-hf.txt $(PIP_QUIET)
	touch $(HF_STAMP)

# TextRecognitionDataGenerator for `make bench` (bench/synth.py runs it as a subprocess): its pins clash with ours.
$(BENCH_STAMP): requirements-bench.txt
	test -x $(BENCH_VENV)/bin/python || $(PY) -m venv $(BENCH_VENV)
	set -o pipefail; $(BENCH_VENV)/bin/pip install -q -r requirements-bench.txt $(PIP_QUIET)
	$(BENCH_VENV)/bin/python -c "import trdg.generators, PIL; print('bench venv ok: trdg, Pillow', PIL.__version__)"
	touch $(BENCH_STAMP)

$(STAMP): requirements.txt requirements.lock pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY) (Python 3.11)"; exit 1; }
	@missing=""; for f in $(CJK_FONTS); do test -f $$f || missing="$$missing $$f"; done; \
	if [ -n "$$missing" ]; then echo "installing Debian's CJK fonts (OCR tests, synthetic text):$$missing"; \
	  $(SUDO) apt-get install -y -q --no-install-recommends $(CJK_PACKAGES) >/dev/null || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q --no-install-recommends $(CJK_PACKAGES) >/dev/null; } || \
	  { echo "need$$missing: apt-get install $(CJK_PACKAGES)"; exit 1; }; fi
	@test -x $(BROWSER) || { echo "installing Debian's chromium (the grading page and report tests drive it headless)"; \
	  $(SUDO) apt-get install -y -q --no-install-recommends chromium >/dev/null || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q --no-install-recommends chromium >/dev/null; } || \
	  { echo "need $(BROWSER): apt-get install chromium"; exit 1; }; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	set -o pipefail; $(BIN)/pip install -q -r requirements.txt -c requirements.lock $(PIP_QUIET)
	set -o pipefail; $(BIN)/pip install -q --no-deps rapidocr==3.10.0 mediapipe==0.10.21 $(PIP_QUIET)
	set -o pipefail; $(BIN)/pip install -q --no-deps -e . $(PIP_QUIET)
	$(BIN)/python -c "import cv2, numpy, pyarrow, ray, prefect, duckdb, PIL; print('setup ok: numpy', numpy.__version__, 'cv2', cv2.__version__)"
	touch $(STAMP)

demo: setup
	$(BIN)/python -m t2i.demo

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow" tests
	$(BIN)/python -m pytest -q -m slow tests

lint: setup
	$(BIN)/ruff check .

bench: setup $(BENCH_STAMP)
	$(BIN)/python -m bench.run

bench-quick: setup $(BENCH_STAMP)
	$(BIN)/python -m bench.run --quick

lock: setup
	$(BIN)/pip freeze --exclude-editable | grep -viE "^(rapidocr|mediapipe|t2i-curate)==" > requirements.lock.new
	{ echo "# Full pinned set, used as pip constraints by \`make setup\`. Regenerate: make lock"; cat requirements.lock.new; } > requirements.lock
	rm requirements.lock.new

clean:
	rm -rf $(VENV) $(HF_VENV) $(TOOLS_VENV) demo-out bench-out bench-results.json
