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
