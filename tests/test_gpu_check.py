"""``make gpu-check`` (tests/benchmarks/gpu_check.py): the no-GPU path, the dry run and the orchestration.

The GPU sections themselves run only on a machine with a GPU (``make gpu-check``)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


def _has_gpu() -> bool:
    import torch

    try:
        import faiss

        gpus = faiss.get_num_gpus()
    except ImportError:
        gpus = 0
    return torch.cuda.is_available() or gpus > 0


def _run(*args: str, env: dict | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.skipif(_has_gpu(), reason="a GPU is present: the check would really run (make gpu-check)")
def test_without_a_gpu_it_says_so_and_exits_0(tmp_path: Path) -> None:
    output = tmp_path / "RESULTS_gpu.md"
    env = dict(os.environ, PATH=str(tmp_path / "empty-bin") + os.pathsep + os.environ.get("PATH", ""))
    done = _run("--output", str(output), env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "gpu-check: no CUDA GPU (torch.cuda.is_available() is False, faiss.get_num_gpus() == 0); nothing run" in done.stdout
    assert not output.exists()


@pytest.mark.skipif(_has_gpu(), reason="a GPU is present")
def test_a_gpu_that_no_library_sees_is_a_failure(tmp_path: Path) -> None:
    """nvidia-smi lists a GPU but torch and faiss see none (driver mismatch, CPU-only builds): not a silent pass."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 550.54, 81559 MiB'\n")
    fake.chmod(0o755)
    env = dict(os.environ, PATH=str(bin_dir) + os.pathsep + os.environ.get("PATH", ""))
    done = _run("--output", str(tmp_path / "RESULTS_gpu.md"), env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "nvidia-smi lists NVIDIA H100 80GB HBM3" in done.stdout and "torch.cuda.is_available() is False" in done.stdout


def test_dry_run_lists_every_section_and_everything_imports(tmp_path: Path) -> None:
    module = _module()
    done = _run("--dry-run", "--workdir", str(tmp_path), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "everything imports and compiles" in done.stdout
    for section in module.SECTIONS:
        assert f"- {section.name} (budget {section.budget_s:.0f} s)" in done.stdout
        assert f"--section {section.name} --workdir {tmp_path / section.name}" in done.stdout
    assert "FAILED" not in done.stdout
    # The sections fit the 8 minutes with room for start-up, and the run enforces it.
    assert module.TOTAL_BUDGET_S <= 450 and all(s.budget_s <= module.TOTAL_BUDGET_S for s in module.SECTIONS)
    assert _run("--dry-run", "--only", "faiss,nope").returncode == 2


def test_a_failing_or_slow_section_is_recorded_and_the_others_still_run(tmp_path: Path) -> None:
    module = _module()
    prefix = module.RESULT_PREFIX

    def section(name: str, code: str, budget: float = 30) -> object:
        return module.Section(name, budget, name, command=[sys.executable, "-c", code])

    sections = [
        section("fails", "import sys; print('boom'); sys.exit(3)"),
        section("slow", "import time; time.sleep(30)", budget=2),
        section("passes", f"print({prefix!r} + '{{\"status\": \"passed\", \"figures\": {{\"x\": 1}}}}')"),
        section("skips", f"print({prefix!r} + '{{\"status\": \"skipped\", \"reason\": \"no data\"}}')"),
        section("late", "print('never')", budget=200),  # under half its budget is left: not started
    ]
    results = module.run_sections(sections, str(tmp_path), str(tmp_path), total_budget_s=60)
    by_name = {r["name"]: r for r in results}
    assert [r["name"] for r in results] == ["fails", "slow", "passes", "skips", "late"]
    assert by_name["fails"]["status"] == "failed" and "exit 3" in by_name["fails"]["reason"]
    assert "boom" in by_name["fails"]["log_tail"]
    assert by_name["slow"]["status"] == "failed" and "budget of 2 s" in by_name["slow"]["reason"]
    assert by_name["slow"]["seconds"] < 20
    assert by_name["passes"]["status"] == "passed" and by_name["passes"]["figures"] == {"x": 1}
    assert by_name["skips"]["status"] == "skipped" and by_name["skips"]["reason"] == "no data"
    assert by_name["late"]["status"] == "skipped" and "total budget" in by_name["late"]["reason"]
    seen = {"nvidia_smi": ["NVIDIA H100 80GB HBM3, 550.54, 81559 MiB"], "faiss_gpus": 1}
    info = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2", "cuda": "13", "onnxruntime": "1", "faiss": "1", "python": "3"}
    text = module.report(results, seen, info, "python tests/benchmarks/gpu_check.py", 10.0)
    assert "FAILED fails, slow" in text and "| passes | passed |" in text and "NVIDIA H100 80GB HBM3" in text
    assert "Commit: " in text and "faiss 1" in text
