# Every target installs what it needs first; `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TF4    := .venv-tf4
TF4_STAMP := $(TF4)/.installed
SLURM_STAMP := $(VENV)/.slurm-installed
LLAMA_TOOLS := $(VENV)/llama.cpp
TOOLS_STAMP := $(LLAMA_TOOLS)/.built
RECIPE ?= demo
ARGS   ?=

.PHONY: install test test-fast demo all bench clean

install: $(STAMP) $(TF4_STAMP) $(SLURM_STAMP) $(TOOLS_STAMP)

# torch is pinned here (a CPU build lies on the dev/CI disk); pyproject keeps an open range for users.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.13.0
	# llama.cpp is compiled from source by llama-cpp-python (~6 min on 2 idle cores); a portable
	# build (no -march=native), so what the tests measured is what any CPU of the kind runs
	# scale: Ray and submitit, for `run --executor ray|slurm` and tests/test_scaleout.py
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PY) -m pip install -q -e '.[test,gguf,scale]'
	# GPTQ runtimes: gptqmodel's build imports torch, so no build isolation, and no CUDA extension
	BUILD_CUDA_EXT=0 $(PY) -m pip install -q --no-build-isolation -e '.[runtimes]'
	touch $(STAMP)

test: $(STAMP) $(TF4_STAMP) $(SLURM_STAMP) $(TOOLS_STAMP)
	$(PY) -m pytest -q $(ARGS)

# The inner loop: every test not marked slow (tests/conftest.py), under a minute on 2 cores.
test-fast: $(STAMP) $(TF4_STAMP) $(TOOLS_STAMP)
	$(PY) -m pytest -q --strict-markers -m "not slow" $(ARGS)

# A real single-node Slurm for the scale-out tests (tests/slurm_cluster.py starts and stops it):
# Debian's daemons, munge and MariaDB for the accounting submitit's sacct needs (as root).
$(SLURM_STAMP): $(STAMP)
	command -v slurmctld >/dev/null && command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null \
	  || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmd \
	      slurmctld slurmdbd slurm-client munge mariadb-server >/dev/null)
	touch $(SLURM_STAMP)

# llama.cpp's own tools (llama-quantize with --imatrix, llama-imatrix, llama-perplexity), built with
# cmake from the very source llama-cpp-python vendors (the version installed above, so the tools
# and the bindings are one llama.cpp): a portable static build, about 3 min on 2 cores, kept in
# the venv until pyproject changes. pipeline/llamacpp_tools.py finds them there.
$(TOOLS_STAMP): $(STAMP)
	rm -rf $(LLAMA_TOOLS) && mkdir -p $(LLAMA_TOOLS)/src
	$(PY) -m pip install -q cmake ninja  # as llama-cpp-python's own build gets them: from PyPI
	$(PY) -m pip download -q --no-deps --no-binary :all: -d $(LLAMA_TOOLS)/src \
	  "llama-cpp-python==$$($(PY) -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')"
	tar -xzf $(LLAMA_TOOLS)/src/llama_cpp_python-*.tar.gz -C $(LLAMA_TOOLS)/src
	$(VENV)/bin/cmake -S $(LLAMA_TOOLS)/src/llama_cpp_python-*/vendor/llama.cpp -B $(LLAMA_TOOLS)/build \
	  -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja \
	  -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF -DLLAMA_OPENSSL=OFF \
	  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
	$(VENV)/bin/cmake --build $(LLAMA_TOOLS)/build -j$$(nproc) \
	  --target llama-quantize llama-imatrix llama-perplexity >/dev/null
	mkdir -p $(LLAMA_TOOLS)/bin && cp $(LLAMA_TOOLS)/build/bin/llama-quantize \
	  $(LLAMA_TOOLS)/build/bin/llama-imatrix $(LLAMA_TOOLS)/build/bin/llama-perplexity $(LLAMA_TOOLS)/bin/
	rm -rf $(LLAMA_TOOLS)/src $(LLAMA_TOOLS)/build
	touch $(TOOLS_STAMP)

# transformers 4.x beside the project's 5.x: tests load converted tokenizers (chat templates,
# infilling) in both. Tokenizers only, so no torch: about 20 s to install.
$(TF4_STAMP):
	$(PYTHON) -m venv $(TF4)
	$(TF4)/bin/python -m pip install -q 'transformers<5' sentencepiece protobuf tiktoken jinja2
	touch $(TF4_STAMP)

demo: $(STAMP) $(TOOLS_STAMP)
	$(PY) -m pipeline demo $(ARGS)

all: $(STAMP) $(TOOLS_STAMP)
	$(PY) -m pipeline run $(RECIPE) $(ARGS)

# Stage targets, one per entry of the job's table (pipeline/job.py STAGES): with IN/OUT (SRC or
# FP16 for IN) one stage runs directly on them (`make gguf FP16=work/demo/fp16 OUT=x.gguf
# ARGS="--type Q4_K_M"`); otherwise the recipe's job runs up to and including that stage, reusing
# outputs whose inputs did not change.
STAGES := $(shell grep -o '^    Stage."[a-z_0-9]*"' pipeline/job.py | cut -d'"' -f2)
IN     ?= $(or $(SRC),$(FP16))
.PHONY: $(STAGES)
$(STAGES): $(STAMP)
	$(PY) -m pipeline $(if $(IN),$@ $(IN) $(OUT),run $(RECIPE) --stage $@) $(ARGS)

# Benchmarks (not tests): numbers and ratios against a baseline measured in the same run.
bench: $(STAMP) $(TOOLS_STAMP)
	mkdir -p bench/results
	$(PY) bench/convert.py --layers 2 | tee bench/results/convert.txt
	$(PY) bench/quantize.py --peer 7b,34b | tee bench/results/quantize.txt
	$(PY) bench/real_model.py | tee bench/results/real_model.txt
	$(PY) bench/gguf.py --layers 2 | tee bench/results/gguf.txt
	$(PY) bench/imatrix.py | tee bench/results/imatrix.txt
	$(PY) bench/scaleout.py | tee bench/results/scaleout.txt

clean:
	rm -rf $(VENV) $(TF4) out work .pytest_cache
