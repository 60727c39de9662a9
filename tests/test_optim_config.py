"""Schedule, optimizers and configuration merging."""
import argparse
import math

import pytest
import torch

from trainer.config import ConfigError, OptimConfig, add_arguments, config_from_args, load_recipe, TrainConfig
from trainer.optim import LARS, build_optimizer, lr_at, scaled_lr


def test_lr_schedule_warmup_then_cosine():
    assert lr_at(0, 1.0, 10, 110) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 110) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 10, 110) == pytest.approx(1.0)
    assert lr_at(60, 1.0, 10, 110) == pytest.approx(0.5)  # halfway through the cosine
    assert lr_at(110, 1.0, 10, 110) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(110, 1.0, 10, 110, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(5, 2.0, 0, 10) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_linear_lr_scaling():
    assert scaled_lr(OptimConfig(lr=0.3), 512) == pytest.approx(0.6)
    assert scaled_lr(OptimConfig(lr=0.3, scale_lr=False), 512) == pytest.approx(0.3)


def test_lars_step_hand_worked():
    # One parameter w = [3, 4] (norm 5), gradient g = [0, 1] (norm 1), eta 0.001, no decay, lr 1:
    # trust = 0.001 * 5 / 1 = 0.005; first momentum buffer = trust * g; w <- w - lr * buffer.
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    w.grad = torch.tensor([0.0, 1.0])
    LARS([{"params": [w]}], lr=1.0, momentum=0.9, eta=0.001).step()
    assert torch.allclose(w.detach(), torch.tensor([3.0, 4.0 - 0.005]))


def test_lars_excluded_groups_take_plain_steps():
    b = torch.nn.Parameter(torch.tensor([1.0]))
    b.grad = torch.tensor([2.0])
    LARS([{"params": [b], "lars_exclude": True}], lr=0.1).step()
    assert b.item() == pytest.approx(1.0 - 0.2)


def test_build_optimizer_kinds_and_error():
    params = [{"params": [torch.nn.Parameter(torch.zeros(2))], "weight_decay": 0.0, "lars_exclude": True}]
    assert isinstance(build_optimizer(params, OptimConfig(optimizer="sgd"), 0.1), torch.optim.SGD)
    assert isinstance(build_optimizer(params, OptimConfig(optimizer="adamw"), 0.1), torch.optim.AdamW)
    assert isinstance(build_optimizer(params, OptimConfig(optimizer="lars"), 0.1), LARS)
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(params, OptimConfig(optimizer="rmsprop"), 0.1)


def _parse(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_recipe_then_flags_then_set():
    config = _parse("--objective", "simclr", "--train-data", "x.tar", "--max-steps", "3", "--lr", "0.1",
                    "--set", "temperature=0.2", "--set", "augment={crop_scale: [0.5, 1.0]}")
    assert config.backbone == "resnet18-cifar"  # from trainer/recipes/simclr.yaml
    assert config.optim.lr == 0.1 and config.max_steps == 3
    assert config.objective_options["temperature"] == 0.2
    assert config.objective_options["projection_dim"] == 128  # recipe value kept
    assert config.objective_options["augment"] == {"crop_scale": [0.5, 1.0]}


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="--train-data is required"):
        _parse("--objective", "simclr", "--max-steps", "1")
    with pytest.raises(ConfigError, match="--max-steps or --epochs"):
        _parse("--objective", "simclr", "--train-data", "x")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 1.0\n")
    with pytest.raises(ConfigError, match="unknown option 'learning_rate'"):
        load_recipe(str(bad), TrainConfig())
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(str(tmp_path / "missing.yaml"), TrainConfig())
