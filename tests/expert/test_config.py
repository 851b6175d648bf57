"""Stage configs: frozen, unknown keys rejected with a suggestion, all problems at once."""

import pydantic
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
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.epochs = 4
    assert cfg.canonical() == {"learning_rate": 1e-4, "epochs": 3, "lora": {"rank": 8}}


@pytest.mark.parametrize("override, named", [
    ("eval.device=gpu", "'eval.device': must be 'auto', 'cpu'"),
    ("train.learning_rate=.inf", "'train.learning_rate': Input should be a finite number"),
    ("quantize.damp_percent=nan", "'quantize.damp_percent': Input should be a finite number"),
])
def test_values_that_would_fail_hours_later_are_refused_when_the_config_loads(override, named):
    from expert.pipeline_config import load_config

    load_config(None, ["eval.device=cuda:1"])  # a device with an index is fine
    with pytest.raises(ConfigError, match=named):
        load_config(None, [override])


@pytest.mark.parametrize("override, message", [
    # a value that fits no member of a union type: said once, with what each member takes
    ("train.target_modules=q_proj",
     "'train.target_modules': Input should be a valid list or 'all-linear' (got 'q_proj');"),
    ("train.micro_batch_size=big", "'train.micro_batch_size': Input should be a valid integer"),
    # a validator's message, without pydantic's "Value error, "
    ("quantize.bits=5", "'quantize.bits': must be one of (2, 3, 4, 8) (got 5)"),
    ("train=null", "'train' is empty (a section with nothing under it): give its fields, or leave it out"),
])
def test_messages_name_the_field_as_written_without_pydantic_internals(override, message):
    from expert.pipeline_config import load_preset

    with pytest.raises(ConfigError) as err:
        load_preset("default", [override, "data.pubmedqa.fold=12"])
    text = str(err.value) + ";"
    assert message in text, text
    assert "'data.pubmedqa.fold': Input should be less than or equal to 9 (got 12)" in text  # every problem
    assert not any(tag in text for tag in ("list[str]", "literal[", "Value error", "function-"))
