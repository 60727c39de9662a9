"""manyview vs lightly (``bench_vs_lightly.py``) as an on-demand test: ``make benchmark`` (never in the default run),
plus fast checks of the driver's method table and commands (in the default run).

Small by default; the environment scales it up: BENCH_BUDGET (seconds of training per run, 120), BENCH_REPEATS
(1), BENCH_METHODS (default: all of the driver's METHODS),
BENCH_EVAL_LIMIT (bank and query images, 2000; 0 = all), BENCH_LIMIT_TRAIN_SHARDS (10), BENCH_SKIP_STEPS (3),
BENCH_BATCH_SIZE (256; smaller only to smoke-test the harness),
BENCH_OUTPUT (append the results section to this Markdown file; default: printed only),
BENCH_CHECK_TARGETS (1: fail unless manyview's median images/s is at least lightly's and its kNN top-1 is
within 1 point of lightly's or better; 0: only check that both sides trained and were evaluated).
The full benchmark: ``BENCH_BUDGET=600 BENCH_EVAL_LIMIT=0 BENCH_OUTPUT=tests/benchmarks/RESULTS.md make benchmark``.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
VIT_METHODS = ("mae", "ijepa", "ibot")


def _driver():
    spec = importlib.util.spec_from_file_location("bench_vs_lightly", os.path.join(HERE, "bench_vs_lightly.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


def _lightly_side_constant(name: str):
    """A literal module constant of lightly_side.py, read without importing it (it imports lightly)."""
    with open(os.path.join(HERE, "lightly_side.py"), encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"lightly_side.py defines no {name}")


def _flag(command: list[str], name: str) -> str:
    return command[len(command) - 1 - command[::-1].index(name) + 1]  # the last value given, as argparse reads it


def test_both_sides_list_the_same_methods():
    driver = _driver()
    assert set(VIT_METHODS) <= set(driver.METHODS)
    assert tuple(_lightly_side_constant("METHODS")) == driver.METHODS


def test_method_args_reach_both_sides_and_manyview_reads_them(tmp_path):
    """Each ViT method's extra flags end both sides' commands, use only flags the lightly side takes, and are
    options manyview's objective accepts and sets (read through manyview's own command-line code)."""
    from trainer.config import add_arguments, config_from_args
    from trainer.objectives import get_objective
    from trainer.objectives.base import parse_options

    driver = _driver()
    args = driver.parse_args(["--methods", ",".join([*VIT_METHODS, "simclr"]), "--workdir", str(tmp_path)])
    taken = set(_lightly_side_constant("RECIPE_FLAGS"))
    expected = {"mae": {"decoder_width": 64, "decoder_depth": 2, "decoder_heads": 2},
                "ijepa": {"predictor_dim": 64, "predictor_depth": 2, "predictor_heads": 2},
                "ibot": {"out_dim": 256, "patch_out_dim": 256, "num_local_crops": 2,
                         "warmup_teacher_temperature_steps": 50, "freeze_last_layer_steps": 0}}
    for method in VIT_METHODS:
        manyview = driver.train_command("manyview", method, args, "DATA", "RUN", 20)
        lightly = driver.train_command("lightly", method, args, "DATA", "RUN", 20)
        extra = driver.method_args(method, args)
        assert extra and manyview[-len(extra):] == extra and lightly[-len(extra):] == extra
        assert _flag(manyview, "--backbone") == _flag(lightly, "--backbone") == "vit-micro-cifar"
        assert {item for item in extra if item.startswith("--")} <= taken
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        config = config_from_args(parser.parse_args(manyview[2:]))  # without the interpreter and the script
        assert (config.backbone, config.optim.optimizer, config.optim.lr, config.optim.weight_decay,
                config.optim.warmup_steps) == ("vit-micro-cifar", "adamw", 4e-3, 0.05, 10)
        options = parse_options(get_objective(method).Options, config.objective_options, method)
        assert {name: getattr(options, name) for name in expected[method]} == expected[method]
    simclr = driver.train_command("lightly", "simclr", args, "DATA", "RUN", 20)
    assert driver.method_args("simclr", args) == [] and _flag(simclr, "--backbone") == "resnet18-cifar"


def test_backbone_and_method_args_can_be_overridden(tmp_path):
    driver = _driver()
    args = driver.parse_args(["--methods", "mae,ijepa", "--backbone", "vit-tiny-cifar", "--workdir", str(tmp_path),
                              "--method-args", "mae=--lr 1e-3 --set decoder_width=32"])
    assert driver.method_args("mae", args) == ["--lr", "1e-3", "--set", "decoder_width=32"]
    assert driver.method_args("ijepa", args) == driver.METHOD_ARGS["ijepa"]
    for side in driver.SIDES:
        command = driver.train_command(side, "mae", args, "DATA", "RUN", 20)
        assert _flag(command, "--backbone") == "vit-tiny-cifar" and _flag(command, "--lr") == "1e-3"
    with pytest.raises(SystemExit):
        driver.parse_args(["--method-args", "nope=--lr 1", "--workdir", str(tmp_path)])


@pytest.mark.benchmark
def test_manyview_matches_lightly(tmp_path):
    driver = _driver()
    if not os.path.exists(os.path.join(driver.DEFAULT_DATA, "test-000000.tar.gz")):
        pytest.skip(f"CIFAR-10 shards not found at {driver.DEFAULT_DATA}")
    try:
        driver.ensure_lightly()
    except (subprocess.CalledProcessError, RuntimeError) as error:
        pytest.skip(f"lightly could not be installed into {driver.BENCH_SITE}: {error}")
    argv = ["--budget", _env("BENCH_BUDGET", "120"), "--repeats", _env("BENCH_REPEATS", "1"),
            "--methods", _env("BENCH_METHODS", ",".join(driver.METHODS)),
            "--batch-size", _env("BENCH_BATCH_SIZE", "256"), "--skip-steps", _env("BENCH_SKIP_STEPS", "3"),
            "--limit-train-shards", _env("BENCH_LIMIT_TRAIN_SHARDS", "10"), "--workdir", str(tmp_path)]
    eval_limit = int(_env("BENCH_EVAL_LIMIT", "2000"))
    if eval_limit > 0:
        argv += ["--eval-limit", str(eval_limit)]
    if os.environ.get("BENCH_OUTPUT"):
        argv += ["--output", os.environ["BENCH_OUTPUT"]]
    print(f"\n{sys.executable} tests/benchmarks/bench_vs_lightly.py {' '.join(argv)}")
    result = driver.run(argv)

    for row in result["rows"]:
        assert math.isfinite(row["images_per_s"]) and row["images_per_s"] > 0, row
        assert 0.0 <= row["knn_top1"] <= 1.0, row
        assert row["steps"] > int(_env("BENCH_SKIP_STEPS", "3")), row
    if _env("BENCH_CHECK_TARGETS", "1") == "1":
        misses = [f"{s['method']}: images/s ratio {s['throughput_ratio']:.3f} (target >= 1), kNN diff "
                  f"{s['knn_diff_points']:+.2f} points (target >= -1)"
                  for s in result["summary"] if not (s["throughput_target_met"] and s["knn_target_met"])]
        assert not misses, "targets missed:\n" + "\n".join(misses) + "\n\n" + result["markdown"]


def test_image_size_and_mixed_precision_reach_both_sides(tmp_path):
    """--image-size and --mixed-precision go to both sides with the same values, and manyview's own command-line
    code reads them; without them both sides get --mixed-precision no and the recipe's image size."""
    from trainer.config import add_arguments, config_from_args

    driver = _driver()
    args = driver.parse_args(["--methods", "mae,simclr", "--workdir", str(tmp_path), "--image-size", "24",
                              "--mixed-precision", "fp16"])
    for method in ("mae", "simclr"):
        commands = {side: driver.train_command(side, method, args, "DATA", "RUN", 20) for side in driver.SIDES}
        for command in commands.values():
            assert _flag(command, "--image-size") == "24" and _flag(command, "--mixed-precision") == "fp16"
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        config = config_from_args(parser.parse_args(commands["manyview"][2:]))
        assert (config.data.image_size, config.mixed_precision) == (24, "fp16")
    plain = driver.parse_args(["--methods", "mae", "--workdir", str(tmp_path)])
    for side in driver.SIDES:
        command = driver.train_command(side, "mae", plain, "DATA", "RUN", 20)
        assert _flag(command, "--mixed-precision") == "no" and "--image-size" not in command
    for bad in (["--mixed-precision", "fp8"], ["--image-size", "0"]):
        with pytest.raises(SystemExit):
            driver.parse_args([*bad, "--workdir", str(tmp_path)])


@pytest.mark.benchmark  # 15-45 s on 2 cores: `make benchmark`, to keep `make test` in budget
def test_lightly_side_trains_in_fp16_with_a_gradient_scaler(tmp_path):
    """The lightly side's fp16 path (autocast + GradScaler, unscaled before the recipe's clip) trains and logs finite
    losses on this CPU; bf16 is run end to end in tests/test_gpu_check.py (the vit-224px section's CPU version)."""
    driver = _driver()
    shard = os.path.join(driver.DEFAULT_DATA, "train-000000.tar.gz")
    if not os.path.exists(shard):
        pytest.skip(f"CIFAR-10 shards not found at {driver.DEFAULT_DATA}")
    if driver._lightly_version() is None:
        pytest.skip(f"lightly is not installed in {driver.BENCH_SITE} (bench_vs_lightly.py installs it there)")
    args = driver.parse_args(["--methods", "mae", "--workdir", str(tmp_path), "--image-size", "16",
                              "--mixed-precision", "fp16", "--batch-size", "4", "--num-workers", "0", "--budget", "60",
                              "--method-args", "mae=--grad-clip 1.0 --set decoder_width=32 --set decoder_depth=1"])
    command = driver.train_command("lightly", "mae", args, shard, str(tmp_path / "run"), 2)
    done = subprocess.run(command, env=driver._subprocess_env(True), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    with open(tmp_path / "run" / "metrics.jsonl", encoding="utf-8") as handle:
        losses = [json.loads(line)["loss"] for line in handle if line.strip()]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    with open(tmp_path / "run" / "model" / "config.json", encoding="utf-8") as handle:
        saved = json.load(handle)
    assert saved["mixed_precision"] == "fp16" and saved["model"]["image_size"] == 16
