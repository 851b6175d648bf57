"""The repository's own prefect.yaml against a real Prefect server, the way users drive it.

Starts `prefect server start` on 127.0.0.1 (SQLite in a temp folder), runs `make deploy` (the
process and Docker work pools, then `prefect --no-prompt deploy --all` from the repository),
starts a process worker, and runs the
pipeline deployment on the tiny preset with `prefect deployment run --watch`: first everything
computes, then everything is `Cached`, then `force=["train"]` recomputes train and what follows
only. Every process it starts runs in its own process group and is stopped by PID.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from expert.artifacts import MANIFEST
from tests.fixtures.pipeline import tiny_config_dict, tiny_inputs
from tests.fixtures.prefect_home import PREFECT

pytestmark = [pytest.mark.server, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
POOL = "expert-process"
DOCKER_POOL = "expert-docker"  # pipeline-gpu's; no Docker worker here (test_docker_pool.py renders its jobs)


class Server:
    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(root / "home"),  # the server's SQLite database lives here
            "PREFECT_API_URL": self.api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "PREFECT_WORKER_QUERY_SECONDS": "1",  # poll every second, not every 10
            "PREFECT_WORKER_PREFETCH_SECONDS": "1",
            "PWD": str(REPO),  # prefect.yaml's {{ $PWD }}: the repository, as from a shell there
        }
        self.processes: list[subprocess.Popen] = []

    def start(self, *args: str, log: str) -> subprocess.Popen:
        """A long-running prefect command in its own process group (so SIGTERM reaches its children)."""
        proc = subprocess.Popen([PREFECT, *args], cwd=REPO, env=self.env, start_new_session=True,
                                stdout=open(self.root / log, "w"), stderr=subprocess.STDOUT)
        self.processes.append(proc)
        return proc

    def cli(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        done = subprocess.run([PREFECT, *args], cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if check and done.returncode != 0:
            pytest.fail(f"prefect {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}\n"
                        + self.logs())
        return done

    def make(self, *targets: str) -> subprocess.CompletedProcess:
        """The Makefile's targets against this server, with this interpreter's environment; no local
        data (DATA points nowhere), and the environment taken as set up (`-o`: no reinstall)."""
        venv = Path(sys.executable).parents[1]
        done = subprocess.run(["make", "-o", f"{venv}/.installed", f"VENV={venv}", "HOST=127.0.0.1",
                               f"PORT={self.port}", f"DATA={self.root / 'no-data'}", *targets],
                              cwd=REPO, env=self.env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            pytest.fail(f"make {' '.join(targets)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}\n"
                        + self.logs())
        return done

    def post(self, path: str, body: dict) -> list[dict]:
        response = httpx.post(f"{self.api}{path}", json=body, timeout=30)
        response.raise_for_status()
        return response.json()

    def get(self, path: str) -> dict:
        response = httpx.get(f"{self.api}{path}", timeout=30)
        response.raise_for_status()
        return response.json()

    def wait_healthy(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.processes[0].poll() is not None:
                pytest.fail("prefect server exited at start-up:\n" + self.logs())
            try:
                if httpx.get(f"{self.api}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        pytest.fail(f"prefect server not healthy after {timeout} s:\n" + self.logs())

    def stop(self) -> None:
        for proc in reversed(self.processes):
            _stop_group(proc)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.read_text()[-4000:]}" for p in sorted(self.root.glob("*.log")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_group(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("prefect-server"))
    try:
        server.start("server", "start", "--host", "127.0.0.1", "--port", str(server.port), "--no-ui",
                     log="server.log")
        server.wait_healthy()
        server.make("deploy")  # as `make worker` does on a fresh server: pools, then `prefect deploy --all`
        server.start("worker", "start", "--pool", POOL, "--name", "test-worker", log="worker.log")
        yield server
    finally:
        server.stop()
    for proc in server.processes:
        assert proc.poll() is not None, f"process {proc.pid} still running"


def deployment_run(server: Server, name: str, params: dict) -> str:
    """`prefect deployment run NAME --params JSON --watch`; returns the flow run id once it completed."""
    done = server.cli("deployment", "run", name, "--params", json.dumps(params), "--watch",
                      "--watch-interval", "1", "--watch-timeout", "900")
    run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", done.stdout).group(1)
    state = server.get(f"/flow_runs/{run_id}")["state"]
    assert state["type"] == "COMPLETED", f"{state}\n{done.stdout}\n{server.logs()}"
    return run_id


def stage_states(server: Server, run_id: str) -> dict[str, str]:
    runs = server.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
    return {r["name"].split(" [")[0]: r["state"]["name"] for r in runs
            if not r["name"].startswith(("fetch", "model folder"))}


def recomputed(states: dict[str, str]) -> set[str]:
    assert set(states.values()) <= {"Completed", "Cached"}, states
    return {name for name, state in states.items() if state == "Completed"}


def test_deployments_as_declared(server):
    deployments = {d["name"]: d for d in server.post("/deployments/filter", {})}
    assert set(deployments) == {"pipeline-default", "retrain-weekly", "evaluate", "pipeline-gpu"}
    gpu = deployments.pop("pipeline-gpu")
    for d in deployments.values():
        assert d["enforce_parameter_schema"] and d["work_pool_name"] == POOL
        assert d["job_variables"]["env"]["PREFECT_LOGGING_EXTRA_LOGGERS"] == "expert"
        assert d["job_variables"]["env"]["PYTHONPATH"] == str(REPO)  # {{ $PWD }} resolved at deploy time
    # The server took the Docker job variables (it checks them against the pool's template), and
    # the code is looked for in the image, not in the folder the deployment was made from.
    assert gpu["work_pool_name"] == DOCKER_POOL and gpu["global_concurrency_limit"]["limit"] == 1
    assert gpu["job_variables"]["container_create_kwargs"]["device_requests"][0]["capabilities"] == [["gpu"]]
    assert gpu["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/expert"}}]
    assert deployments["pipeline-default"]["global_concurrency_limit"]["limit"] == 1
    schedules = deployments["retrain-weekly"]["schedules"]
    assert [s["schedule"]["cron"] for s in schedules] == ["0 3 * * 1"] and not schedules[0]["active"]
    # The default preset is the flow's default: a run with no parameters runs it.
    schema = deployments["pipeline-default"]["parameter_openapi_schema"]
    assert set(schema["properties"]) == {"config", "force"}


def test_bad_parameter_is_rejected_by_the_server_naming_the_field(server):
    done = server.cli("deployment", "run", "expert-pipeline/pipeline-default", "--params",
                      json.dumps({"config": {"train": {"learning_rate": "fast"}}}), check=False)
    assert done.returncode != 0
    assert "learning_rate" in done.stdout + done.stderr
    done = server.cli("deployment", "run", "expert-pipeline/pipeline-default", "--params",
                      json.dumps({"force": ["trian"]}), check=False)
    assert done.returncode != 0 and "trian" in done.stdout + done.stderr


def test_run_cached_rerun_and_force_through_a_worker(server, tmp_path_factory):
    inputs = tiny_inputs(tmp_path_factory.mktemp("inputs"))
    params = {"config": tiny_config_dict(inputs)}
    name = "expert-pipeline/pipeline-default"

    first = deployment_run(server, name, params)
    states = stage_states(server, first)
    assert len(states) == 12 and recomputed(states) == set(states)
    flow_run = server.get(f"/flow_runs/{first}")
    assert flow_run["name"].startswith("tiny: ") and "gptq4 LoRA r4" in flow_run["name"]
    artifacts = server.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [first]}}})
    kinds = {a["type"] for a in artifacts}
    assert {"table", "markdown", "progress"} <= kinds, kinds
    report = next(a for a in artifacts if a["key"] == "expert-report")
    assert "data:image/png;base64," in report["data"]  # the plots are embedded, not links to files
    logs = server.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [first]}}, "limit": 200})
    assert any(log["name"].startswith("expert.") for log in logs), "library logs missing from the run"

    second = deployment_run(server, name, params)
    assert recomputed(stage_states(server, second)) == set()

    forced = deployment_run(server, name, {**params, "force": ["train"]})
    assert recomputed(stage_states(server, forced)) == {
        "train LoRA r4", "select by dev accuracy", "evaluate pubmedqa (expert)", "evaluate mmlu (expert)", "report"}

    # Evaluation only: the quantized model and the selected adapter, from their folders.
    model = next((inputs["artifacts"] / "quantize").glob("[0-9a-f]*"))
    adapter = next((inputs["artifacts"] / "select").glob("[0-9a-f]*")) / "adapter"
    evaluation = deployment_run(server, "expert-evaluate/evaluate", {
        "model": str(model), "adapter": str(adapter), "label": "check", "artifacts_dir": str(inputs["artifacts"]),
        "data": params["config"]["data"], "evaluation": params["config"]["eval"]})
    assert set(stage_states(server, evaluation)) >= {"evaluate pubmedqa (check)", "evaluate mmlu (check)"}


def test_a_run_cancelled_mid_stage_stops_frees_its_slot_and_loses_nothing(server, tmp_path_factory):
    """Cancel from the UI (here its CLI twin) while training: the run's process ends, the run is
    Cancelled, nothing is left half-written, the deployment's one concurrency slot is free again,
    and the next run reuses every finished stage and resumes training from its last checkpoint."""
    from expert.train import list_checkpoints

    inputs = tiny_inputs(tmp_path_factory.mktemp("inputs"))
    params = {"config": tiny_config_dict(inputs, train={"epochs": 100, "max_steps": 120})}  # long enough to cancel
    name = "expert-pipeline/pipeline-default"
    started = server.cli("deployment", "run", name, "--params", json.dumps(params))
    run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", started.stdout).group(1)
    train = inputs["artifacts"] / "train"
    _wait(server, lambda: any(list_checkpoints(work) for work in train.glob(".work-*")), "a training checkpoint")
    server.cli("flow-run", "cancel", run_id)
    _wait(server, lambda: server.get(f"/flow_runs/{run_id}")["state"]["type"] == "CANCELLED", "the run to be cancelled")
    _wait(server, lambda: not _processes_of(run_id), "the run's process to end")
    cancelled = stage_states(server, run_id)
    finished = {name for name, state in cancelled.items() if state == "Completed"}
    assert {"import model", "quantize gptq 4-bit"} <= finished and "train LoRA r4" not in finished, cancelled
    assert not list(inputs["artifacts"].glob("*/.tmp-*")), "a half-written artifact was left"
    (work,) = train.glob(".work-*")
    kept = list_checkpoints(work)[-1][0]

    again = deployment_run(server, name, params)  # waits for the slot: it must have been released
    states = stage_states(server, again)
    assert finished <= set(states) - recomputed(states) and "train LoRA r4" in recomputed(states), states
    (summary,) = train.glob("*/summary.json")
    assert json.loads(summary.read_text())["resumed_from"] == [kept]


def _task_states(server: Server, run_id: str) -> dict[str, str]:
    runs = server.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
    return {r["name"].split(" [")[0]: r["state"]["name"] for r in runs}


def _processes_of(run_id: str) -> list[int]:
    """Processes running the flow run (the worker gives each its id in the environment; Linux /proc)."""
    mark = f"PREFECT__FLOW_RUN_ID={run_id}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc") if Path("/proc").is_dir() else []):
        try:
            if mark in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.append(int(pid))
        except OSError:
            pass
    return found


def _wait(server: Server, done, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout} s for {what}\n{server.logs()}")
        time.sleep(0.5)


def test_make_keeps_what_an_operator_changed_and_deploys_only_what_is_missing(server):
    """`make worker` after a restart: the pools and the resumed weekly schedule stay as set."""
    def pool_limit() -> int | None:
        return server.get(f"/work_pools/{POOL}")["concurrency_limit"]

    def weekly_schedule() -> dict:
        (deployment,) = [d for d in server.post("/deployments/filter", {}) if d["name"] == "retrain-weekly"]
        (schedule,) = deployment["schedules"]
        return schedule

    assert pool_limit() == 1  # one flow run at a time in the process pool: one GPU
    server.cli("work-pool", "set-concurrency-limit", POOL, "2")
    server.cli("deployment", "schedule", "resume", "expert-pipeline/retrain-weekly", weekly_schedule()["id"])
    resumed = weekly_schedule()
    assert resumed["active"]
    server.make("deployed")  # what `make worker` runs before starting the worker
    assert pool_limit() == 2 and weekly_schedule() == resumed
    server.make("deploy")  # on purpose: prefect.yaml's schedule, paused, as README says
    assert pool_limit() == 2 and not weekly_schedule()["active"]
