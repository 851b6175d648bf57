"""Stage configs: frozen, unknown keys rejected with a suggestion, all problems at once."""

import pytest
from pydantic import Field

from expert.config import StageConfig
from expert.errors import ConfigError


class Inner(StageConfig):
    rank: int = Field(8, gt=0)


class Outer(StageConfig):
    learning_rate: float = Field(1e-4, gt=0)
    epochs: int = 1
    lora: Inner = Field(default_factory=Inner)


def test_unknown_key_gets_did_you_mean():
    with pytest.raises(ConfigError) as err:
        Outer.from_dict({"learning_rte": 0.1}, where="train")
    msg = str(err.value)
    assert "train.learning_rte" in msg and "did you mean 'learning_rate'" in msg


def test_nested_unknown_key_suggests_from_the_nested_model():
    with pytest.raises(ConfigError, match="did you mean 'rank'"):
        Outer.from_dict({"lora": {"rnk": 4}})


class Optional_(StageConfig):
    lora: Inner | None = None


def test_unknown_key_under_an_optional_section_suggests_from_its_model():
    with pytest.raises(ConfigError, match=r"unknown key 'lora.rnk' \(did you mean 'rank'\?\); allowed keys: rank"):
        Optional_.from_dict({"lora": {"rnk": 4}})


def test_a_config_files_name_is_said_once_not_prefixed_to_every_field(tmp_path):
    from expert.pipeline_config import load_config

    path = tmp_path / "run.yaml"
    path.write_text("data:\n  mmlu:\n    num_shot: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert f"in '{path}'" in msg and "unknown key 'data.mmlu.num_shot' (did you mean 'num_shots'?)" in msg
    assert msg.count(str(path)) == 1, msg


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as err:
        Outer.from_dict({"learning_rate": -1, "epochs": "many"})
    msg = str(err.value)
    assert "'learning_rate'" in msg and "'epochs'" in msg and "-1" in msg


def test_frozen_and_canonical():
    cfg = Outer.from_dict({"epochs": 3})
    with pytest.raises(Exception):
        cfg.epochs = 4
    assert cfg.canonical() == {"learning_rate": 1e-4, "epochs": 3, "lora": {"rank": 8}}


@pytest.mark.parametrize("override, named", [
    ("eval.device=gpu", "'eval.device': Value error, must be 'auto', 'cpu'"),
    ("train.learning_rate=.inf", "'train.learning_rate': Input should be a finite number"),
    ("quantize.damp_percent=nan", "'quantize.damp_percent': Input should be a finite number"),
])
def test_values_that_would_fail_hours_later_are_refused_when_the_config_loads(override, named):
    from expert.pipeline_config import load_config

    load_config(None, ["eval.device=cuda:1"])  # a device with an index is fine
    with pytest.raises(ConfigError, match=named):
        load_config(None, [override])
