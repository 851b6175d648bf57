"""The library stays free of Prefect; every shipped preset parses."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_expert_never_imports_prefect():
    offenders = []
    for path in (ROOT / "expert").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "prefect"]
    assert offenders == []


def test_importing_the_library_does_not_load_prefect():
    code = (
        "import importlib, pkgutil, sys, expert\n"
        "for m in pkgutil.walk_packages(expert.__path__, 'expert.'): importlib.import_module(m.name)\n"
        "print('prefect' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("preset", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_parses(preset):
    from expert.pipeline_config import load_config

    config = load_config(preset)
    assert config.model.source


def test_prefect_yaml_deployments_point_at_loadable_flows():
    import yaml
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    flows = {}
    for deployment in spec["deployments"]:
        path, name = deployment["entrypoint"].split(":")
        flows[deployment["name"]] = load_flow_from_entrypoint(f"{ROOT / path}:{name}").name
        assert deployment["enforce_parameter_schema"] is True, deployment["name"]
    assert flows == {"pipeline-default": "expert-pipeline", "retrain-weekly": "expert-pipeline",
                     "evaluate": "expert-evaluate", "pipeline-gpu": "expert-pipeline"}


def test_pipeline_default_is_the_default_preset():
    """`prefect deployment run expert-pipeline/pipeline-default` with no parameters runs configs/default.yaml."""
    from expert.pipeline_config import load_config
    from flows.pipeline import pipeline

    assert pipeline.parameters.properties["config"]["default"] == load_config(
        ROOT / "configs" / "default.yaml").model_dump(mode="json")


def test_the_flow_loads_without_the_heavy_libraries():
    """A cached rerun imports the flow and reads configs only: torch, transformers and
    scikit-learn load when a stage actually runs (seconds saved on every rerun)."""
    import subprocess
    import sys

    code = ("import sys, flows.pipeline, flows.evaluate; "
            "print(sorted(m for m in ('torch', 'transformers', 'sklearn', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
