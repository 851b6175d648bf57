"""TrainConfig: the original project's defaults, and errors that name the bad field."""

import pytest

from expert.errors import ConfigError
from expert.train import TrainConfig


def test_defaults_are_the_original_projects():
    config = TrainConfig()
    assert (config.lora_r, config.lora_alpha, config.target_modules) == (8, 16, ["q_proj", "v_proj"])
    assert (config.micro_batch_size, config.effective_batch_size, config.accumulation_steps) == (2, 50, 25)
    assert config.optimizer == "adamw" and config.lr_scheduler == "linear"
    assert config.gradient_checkpointing == "auto" and config.memory_limit_gib is None


def test_auto_memory_settings_are_accepted():
    config = TrainConfig.from_dict({"micro_batch_size": "auto", "effective_batch_size": 50,
                                    "gradient_checkpointing": "auto", "memory_limit_gib": 24})
    assert (config.micro_batch_size, config.gradient_checkpointing, config.memory_limit_gib) == ("auto", "auto", 24)


def test_all_linear_and_8bit_optimizers_are_accepted():
    config = TrainConfig.from_dict({"target_modules": "all-linear", "optimizer": "paged_adamw_8bit"})
    assert config.target_modules == "all-linear" and config.optimizer == "paged_adamw_8bit"


@pytest.mark.parametrize("values, field, hint", [
    ({"lora_r": 0}, "train.lora_r", "greater than 0"),
    ({"learning_rate": 0}, "train.learning_rate", "greater than 0"),
    ({"epochs": -1}, "train.epochs", "greater than 0"),
    ({"lora_dropout": 1.0}, "train.lora_dropout", "less than 1"),
    ({"micro_batch_size": 4, "effective_batch_size": 10}, "train.effective_batch_size", "multiple of micro_batch_size (4)"),
    ({"target_modules": []}, "train.target_modules", "at least one module"),
    ({"target_modules": ["q_proj", "all-linear"]}, "train.target_modules", "not inside a list"),
    ({"lr_scheduler": "step"}, "train.lr_scheduler", "'linear', 'cosine' or 'constant'"),
    ({"optimizer": "sgd"}, "train.optimizer", "adamw_8bit"),
    ({"max_steps": 0}, "train.max_steps", "greater than 0"),
    ({"save_every_steps": 0}, "train.save_every_steps", "greater than 0"),
    ({"max_length": 4}, "train.max_length", "greater than or equal to 8"),
    ({"micro_batch_size": 0}, "train.micro_batch_size", "greater than 0 (or 'auto')"),
    ({"memory_limit_gib": 0}, "train.memory_limit_gib", "greater than 0"),
])
def test_invalid_values_name_the_field(values, field, hint):
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict(values, where="train")
    assert f"'{field}'" in str(info.value) and hint in str(info.value)


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match="unknown key 'train.learning_rte' \\(did you mean 'learning_rate'\\?\\)"):
        TrainConfig.from_dict({"learning_rte": 1e-3}, where="train")


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict({"lora_r": 0, "seed": -1}, where="train")
    assert "'train.lora_r'" in str(info.value) and "'train.seed'" in str(info.value)
