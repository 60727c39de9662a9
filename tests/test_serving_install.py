"""The serving install: ``pip install .`` (no extras) gives an environment without torch in which
``python -m export.extract``, ``python -m index.build --embeddings`` and ``python -m app`` run.

Builds that environment from nothing (a fresh venv in a temporary directory, the project installed from
a copy of its sources, as a user would from a checkout), checks that torch and the other training
packages are absent, and runs the three commands against a tiny ONNX encoder made here in the test
environment (which has the train extra). The encoder has an int8 variant, so the run also checks that
serving on a CPU picks it and says so. One venv serves all three commands; measured about 1.5-2 minutes
on 2 cores, most of it pip downloading and unpacking onnxruntime-gpu, faiss-gpu and gradio.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from onnx_fixtures import add_int8_variant, make_onnx_dir, make_shard
from server_helpers import free_port, stop_process, wait_until_serving

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "trainer", "export", "index", "app")
TRAINING_PACKAGES = ("torch", "torchvision", "open_clip", "timm", "accelerate", "webdataset", "safetensors", "onnx")
NETWORK_ERRORS = ("NewConnectionError", "Network is unreachable", "Temporary failure in name resolution",
                  "Name or service not known", "Max retries exceeded", "ConnectionError")
INSTALL_TIMEOUT_S = 900


def _env() -> dict:
    """The caller's environment without anything that would leak this venv or the checkout into the new one."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(GRADIO_ANALYTICS_ENABLED="False", HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_OFFLINE="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def _copy_sources(target: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyi", "*.egg-info")
    target.mkdir(parents=True)
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=ignore)
        else:
            shutil.copy2(source, target / name)
    return target


def test_serving_install_runs_without_torch(tmp_path: Path) -> None:
    started = time.perf_counter()
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    env = _env()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env, timeout=300)
    source = _copy_sources(tmp_path / "src")
    # The documented serving install (README: "Serving without torch"), from a checkout.
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-compile", "--quiet", "."], cwd=source,
                             env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    if install.returncode != 0 and any(marker in install.stderr for marker in NETWORK_ERRORS):
        pytest.skip(f"the package index is unreachable, so the serving environment cannot be built: "
                    f"{install.stderr.strip().splitlines()[-1]}")
    assert install.returncode == 0, install.stderr[-4000:]
    installed_s = time.perf_counter() - started

    work = tmp_path / "work"  # run outside the checkout, so only the installed package can be imported
    work.mkdir()
    probe = subprocess.run([str(python), "-c", "import importlib.util, json; print(json.dumps({name: "
                            f"importlib.util.find_spec(name) is not None for name in {list(TRAINING_PACKAGES)!r}}}))"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    present = [name for name, found in json.loads(probe.stdout).items() if found]
    assert not present, f"the serving install pulled in training packages: {present}"
    no_torch = subprocess.run([str(python), "-c", "import torch"], cwd=work, env=env, capture_output=True, text=True,
                              timeout=120)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    # Training commands in this environment say which extra they need instead of a traceback.
    pretrain = subprocess.run([str(venv / "bin" / "manyview"), "pretrain", "--help"], cwd=work, env=env,
                              capture_output=True, text=True, timeout=120)
    assert pretrain.returncode == 2 and "pip install 'manyview[train]'" in pretrain.stderr, pretrain.stderr[-2000:]
    assert "Traceback" not in pretrain.stderr

    # An encoder (with the int8 variant) and shards, made here where torch is installed.
    encoder = add_int8_variant(make_onnx_dir(tmp_path / "onnx", with_text=True))
    make_shard(tmp_path / "data" / "part-000000.tar", count=40, start=0, seed=1)
    make_shard(tmp_path / "data" / "part-000001.tar", count=30, start=40, seed=2)

    def run(*argv: str) -> subprocess.CompletedProcess:
        result = subprocess.run([str(python), "-m", *argv], cwd=work, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, f"python -m {' '.join(argv)} failed:\n{result.stderr[-4000:]}"
        return result

    extracted = run("export.extract", "--encoder", str(encoder), "--data", str(tmp_path / "data" / "part-*.tar"),
                    "--output", str(tmp_path / "emb"), "--workers", "1", "--no-progress")
    summary = json.loads(extracted.stdout)
    assert summary["complete"] and summary["written"] == 70
    assert summary["encoder"] == "int8 variant on CPUExecutionProvider"  # auto picks int8 on a CPU

    built = run("index.build", "--embeddings", str(tmp_path / "emb"), "--output", str(tmp_path / "index"),
                "--no-progress")
    info = json.loads(built.stdout)
    assert info["count"] == 70 and info["encoder_variant"] == "int8"
    assert "int8 variant on CPUExecutionProvider" in built.stderr

    port = free_port()
    log = tmp_path / "app.log"
    with open(log, "w") as output:
        app = subprocess.Popen([str(python), "-m", "app", "--encoder", str(encoder), "--index", str(tmp_path / "index"),
                                "--host", "127.0.0.1", "--port", str(port)], cwd=work, env=env, stdout=output,
                               stderr=subprocess.STDOUT)
        try:
            wait_until_serving(f"http://127.0.0.1:{port}/", app, log, timeout_s=180.0)
            deadline = time.monotonic() + 30
            while "searching 70 images" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.5)
        finally:
            stop_process(app, timeout_s=30.0)
    text = log.read_text()
    assert "searching 70 images" in text and "int8 variant on CPUExecutionProvider" in text, text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    print(f"serving install: {installed_s:.0f} s to build the venv, {time.perf_counter() - started:.0f} s in all")
