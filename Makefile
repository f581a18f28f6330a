# Every target installs what it needs first; `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
RECIPE ?= demo
ARGS   ?=

.PHONY: install test demo all convert quantize verify publish bench clean

install: $(STAMP)

# torch is pinned here (a CPU build lies on the dev/CI disk); pyproject keeps an open range for users.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

demo: $(STAMP)
	$(PY) -m pipeline demo $(ARGS)

all: $(STAMP)
	$(PY) -m pipeline run $(RECIPE) $(ARGS)

# Stage targets: with SRC/OUT (or IN/OUT) they run one stage directly; otherwise they run the
# recipe's job up to and including that stage, reusing outputs whose inputs did not change.
convert: $(STAMP)
ifdef SRC
	$(PY) -m pipeline convert $(SRC) $(OUT) $(ARGS)
else
	$(PY) -m pipeline run $(RECIPE) --stage convert $(ARGS)
endif

quantize: $(STAMP)
	$(PY) -m pipeline run $(RECIPE) --stage quantize $(ARGS)

verify: $(STAMP)
	$(PY) -m pipeline run $(RECIPE) --stage verify $(ARGS)

publish: $(STAMP)
	$(PY) -m pipeline run $(RECIPE) --stage publish $(ARGS)

# Benchmarks (not tests): numbers and ratios against a baseline measured in the same run.
bench: $(STAMP)
	mkdir -p bench/results
	$(PY) bench/convert.py --layers 2 | tee bench/results/convert.txt
	$(PY) bench/quantize.py | tee bench/results/quantize.txt

clean:
	rm -rf $(VENV) out work .pytest_cache
