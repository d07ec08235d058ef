# deid: one command to install, one to test, one to demo. See README.md.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
SHARED ?= $(abspath ../shared)
# The team's ../shared/models is the fast path. Without it, deid fetches the model files it needs
# on first use into ~/.cache/deid, from $$DEID_MODELS_URL/<name> when that is set (a mirror).
ifneq ($(wildcard $(SHARED)/models),)
export DEID_MODELS_DIR ?= $(SHARED)/models
endif
# The bundled input: made by `deid demo-clip` from a public-domain photo inside scikit-image.
DEMO_IN  ?= out/demo_in.mp4
DEMO_OUT ?= out/demo_out.mp4
DEMO_METHOD ?= generate

.PHONY: install test demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Without an NVIDIA GPU, install the CPU build of PyTorch first: an unpinned `torch` would pull
# the CUDA build (several GB). Tries a local/configured +cpu wheel, then PyTorch's CPU index.
$(VENV)/.torch: | $(BIN)/python
	@if command -v nvidia-smi >/dev/null 2>&1; then \
	  echo "NVIDIA GPU found: installing the CUDA build of torch"; $(BIN)/pip install -q "torch>=2.2"; \
	else \
	  echo "no NVIDIA GPU: installing the CPU build of torch"; \
	  $(BIN)/pip install -q "torch==2.13.0+cpu" 2>/dev/null || \
	  $(BIN)/pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu; \
	fi
	@touch $@

$(VENV)/.deid: pyproject.toml | $(VENV)/.torch
	$(BIN)/pip install -q -e ".[test]"
	@touch $@

install: $(VENV)/.deid

test: install
	$(BIN)/python -m pytest -q

out/demo_in.mp4: | $(VENV)/.deid
	$(BIN)/deid demo-clip $@

demo: install $(DEMO_IN)
	$(BIN)/deid anonymize "$(DEMO_IN)" "$(DEMO_OUT)" --method $(DEMO_METHOD) --overwrite
	@echo "wrote $(DEMO_OUT)"

clean:
	rm -rf $(VENV) out .pytest_cache
