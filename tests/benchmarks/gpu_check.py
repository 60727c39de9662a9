"""Every GPU-only test and benchmark in one command (``make gpu-check``), with correctness checks and figures.

    python tests/benchmarks/gpu_check.py [--output tests/benchmarks/RESULTS_gpu.md] [--only faiss,onnx] [--dry-run]

Sections, each in its own process with its own time budget (``SECTIONS``; a section gets at most
what is left of ``--total-budget``, 540 s, and is not started with under half its budget left, so the run ends
within 9 minutes on one H100, inside a 10-minute limit with start-up; each section's process is told its limit in
``$GPU_CHECK_SECTION_TIMEOUT_S``):

* ``faiss``: exact ``Flat`` search on the GPU (float32) returns the CPU's ids and scores (ties excepted), and
  through ``index.devices.to_gpu`` (float16 storage) recall@10 >= 0.97 with scores within 5e-3; an
  ``IVF1024,Flat`` index built and tuned by ``index.build`` on the GPU reaches the same recall@10 against
  exact search when searched on the GPU and on the CPU (within 0.01); queries/s on both.
* ``onnx``: the exported encoder on ONNX Runtime's CUDA provider (checked active, not a silent CPU fallback)
  gives the CPU provider's embeddings (fp32: max abs diff <= 2e-3, min cosine >= 0.9999; fp16: 2e-2 / 0.999;
  IO binding = no binding); then ``bench_onnx.py``'s eager/ONNX CPU/CUDA throughput rows for resnet18-cifar.
* ``bf16``: ``trainer/pretrain.py --mixed-precision bf16`` on CUDA (simclr and byol, resnet18-cifar, batch 256,
  augmentation on the device, 30 steps): every logged loss finite, every step logged, the saved weights finite;
  the first loss against an fp32 run of the same seed is reported.
* ``augment``: ``BatchedAugment`` on CUDA at 32 px and 224 px: shape, dtype, device, finite values inside the
  normalised [0, 1] range, the same output as the CPU for the same parameters (TF32 off), the same output for
  the same seed, two-view batches that differ; images/s (and ``bench_augment.py``'s table with CIFAR-10).
* ``tests``: the suite's GPU tests (``pytest -k 'cuda or gpu or provider'`` over the batched-augmentation,
  index and export tests), none of them skipped.
* ``speed-32px`` (and ``speed-224px``, last): ``bench_training_speed.py --bf16`` (simclr, resnet18-cifar at 32 px
  batch 256; resnet50 at 224 px batch 64 if the total budget allows): images/s of per-image and batched
  augmentation, lightly and the ceiling, with every side's losses finite. lightly is used only when it is
  already installed in ``.bench-site`` (``bench_vs_lightly.py`` installs it there, which needs the internet);
  otherwise that side is skipped and the report says so. Both need the CIFAR-10 shards (``../shared/data/cifar10``).
* ``vit-224px``: ``bench_vs_lightly.py`` for mae, ibot and ijepa with ``--backbone timm:vit_small_patch16_224
  --image-size 224 --mixed-precision bf16`` at batch 64 (``VIT_224``, flags ``VIT_224_METHOD_ARGS`` on both
  sides), 1 repeat, kNN on 256 bank / 256 query images: per method images/s of both sides and their ratio, kNN
  of both, every logged loss finite, every step logged, and both sides' runs recorded at that backbone, size and
  precision. It fits its runs to the time it is given (``plan_vit_runs``: up to 20 s of training a run, as many
  methods as fit at >= 8 s; the others are listed as not run); ``--only vit-224px`` gives it all 240 s. Skipped
  when lightly is not in ``.bench-site`` or the CIFAR-10 shards are absent.

A failed section is recorded and the others still run; the exit code is 1 if any section failed. Without a
CUDA GPU (``torch.cuda.is_available()`` False and ``faiss.get_num_gpus() == 0``) nothing runs and the exit
code is 0; if ``nvidia-smi`` lists a GPU that neither library sees, that is a failure. Figures are appended
to ``--output`` with the GPU's name, the torch / onnxruntime / faiss versions, the date and the commit.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import platform
import py_compile
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for _path in (str(REPO), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

DEFAULT_DATA = str(REPO.parent / "shared" / "data" / "cifar10")
DEFAULT_OUTPUT = str(HERE / "RESULTS_gpu.md")
TOTAL_BUDGET_S = 540.0
RESULT_PREFIX = "GPU_CHECK_RESULT "
TIMEOUT_ENV = "GPU_CHECK_SECTION_TIMEOUT_S"  # set for each section's process: the seconds it has before it is killed
GPU_TESTS = ["tests/test_batched_augment.py", "tests/test_index.py", "tests/test_index_scale.py", "tests/test_export.py"]
GPU_TESTS_SELECTION = "cuda or gpu or provider"


class CheckFailed(AssertionError):
    """A correctness check of a section failed (the message says which and by how much)."""


class Skipped(Exception):
    """A section cannot run here (e.g. no CIFAR-10 shards); the message says why."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


@dataclass
class Section:
    name: str
    budget_s: float
    what: str
    command: list[str] = field(default_factory=list)  # empty: this script's own ``--section NAME``
    imports: tuple[str, ...] = ()                        # modules the section imports (``--dry-run`` imports them)
    scripts: tuple[str, ...] = ()                        # scripts it runs (``--dry-run`` compiles them)


SECTIONS = [
    Section("faiss", 60, "FAISS GPU vs CPU: Flat ids/scores equal, GPU-built IVF recall@10 equal on GPU and CPU",
            imports=("faiss", "index.build", "index.devices", "bench_index")),
    Section("onnx", 60, "ONNX Runtime CUDA provider vs CPU embeddings (fp32, fp16, IO binding), bench_onnx rows",
            imports=("onnxruntime", "export.onnx", "export.runtime", "bench_onnx")),
    Section("bf16", 75, "bf16 training steps on CUDA (simclr, byol): finite losses and weights",
            imports=("trainer.prepare", "trainer.models"), scripts=("trainer/pretrain.py",)),
    Section("augment", 45, "batched augmentation on CUDA: shapes, dtypes, ranges, CPU parity, images/s",
            imports=("trainer.data.batched_augment", "trainer.data.views", "bench_augment")),
    Section("tests", 90, f"the suite's GPU tests (pytest -k '{GPU_TESTS_SELECTION}'), none skipped",
            imports=("pytest",), scripts=tuple(GPU_TESTS)),
    Section("speed-32px", 150, "training images/s, simclr resnet18-cifar 32 px batch 256 bf16: per-image, batched, "
            "lightly, ceiling", imports=("bench_training_speed", "bench_vs_lightly", "trainer.loop"),
            scripts=("tests/benchmarks/ceiling_side.py", "tests/benchmarks/lightly_side.py", "trainer/pretrain.py")),
    Section("vit-224px", 240, "manyview vs lightly for mae, ibot, ijepa on timm:vit_small_patch16_224 at 224 px "
            "in bf16, batch 64: images/s of both, ratio, kNN of both, finite losses (the methods its time allows)",
            imports=("bench_vs_lightly",), scripts=("tests/benchmarks/lightly_side.py", "trainer/pretrain.py")),
    Section("speed-224px", 90, "training images/s, simclr resnet50 224 px batch 64 bf16: batched, lightly, ceiling "
            "(if the total budget allows)", imports=("bench_training_speed",),
            scripts=("tests/benchmarks/ceiling_side.py", "tests/benchmarks/lightly_side.py")),
]


# ------------------------------------------------------------------------------------------------ machine
def gpu_presence() -> dict:
    """What sees a GPU: torch, faiss and nvidia-smi (each may be missing)."""
    seen = {"torch_cuda": False, "faiss_gpus": 0, "nvidia_smi": [], "errors": []}
    try:
        import torch

        seen["torch_cuda"] = bool(torch.cuda.is_available())
    except Exception as error:  # noqa: BLE001 - report, do not crash
        seen["errors"].append(f"torch: {type(error).__name__}: {error}")
    try:
        import faiss

        seen["faiss_gpus"] = int(faiss.get_num_gpus())
    except Exception as error:  # noqa: BLE001
        seen["errors"].append(f"faiss: {type(error).__name__}: {error}")
    seen["nvidia_smi"] = nvidia_smi_gpus()
    return seen


def nvidia_smi_gpus() -> list[str]:
    """``name, driver, memory`` per GPU that ``nvidia-smi`` lists ([] when it is absent or lists none)."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def no_gpu_message(seen: dict) -> str:
    return (f"gpu-check: no CUDA GPU (torch.cuda.is_available() is {seen['torch_cuda']}, faiss.get_num_gpus() == "
            f"{seen['faiss_gpus']}); nothing run" + (f" [{'; '.join(seen['errors'])}]" if seen["errors"] else ""))


def commit() -> str:
    """Short commit of the checkout, "+dirty" with uncommitted changes; ``GPU_CHECK_COMMIT`` without git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("GPU_CHECK_COMMIT", "unknown (no git checkout)")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "onnxruntime", "faiss"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception as error:  # noqa: BLE001
            out[name] = f"not importable ({type(error).__name__})"
    try:
        import torch

        out["cuda"] = torch.version.cuda
        out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        out["cuda"], out["gpu"] = None, None
    return out


# ------------------------------------------------------------------------------------------------ orchestration
def section_command(section: Section, workdir: str, data: str) -> list[str]:
    if section.command:
        return list(section.command)
    return [sys.executable, str(Path(__file__).resolve()), "--section", section.name, "--workdir",
            os.path.join(workdir, section.name), "--data", data]


def parse_result(log: str) -> dict | None:
    for line in reversed(log.splitlines()):
        if line.startswith(RESULT_PREFIX):
            try:
                return json.loads(line[len(RESULT_PREFIX):])
            except json.JSONDecodeError:
                return None
    return None


def run_section(section: Section, command: list[str], timeout_s: float, log_path: str) -> dict:
    """Run one section's process within ``timeout_s`` (its whole process group is killed past it)."""
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        # The section's own process learns its time limit (TIMEOUT_ENV) so that it can fit its work to it.
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=dict(os.environ, **{TIMEOUT_ENV: f"{timeout_s:.0f}"}))
        try:
            code = process.wait(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            code = process.wait()
    seconds = time.perf_counter() - started
    with open(log_path, encoding="utf-8", errors="replace") as handle:
        text = handle.read()
    result = parse_result(text) or {}
    tail = "\n".join(text.strip().splitlines()[-15:])
    if timed_out:
        result = {**result, "status": "failed", "reason": f"ran past its budget of {timeout_s:.0f} s (killed)"}
    elif not result:
        result = {"status": "failed", "reason": f"exit {code} without a result line"}
    elif code != 0 and result.get("status") != "failed":
        result = {**result, "status": "failed", "reason": f"exit {code}; {result.get('reason', '')}".strip("; ")}
    result.setdefault("reason", "")
    result.setdefault("figures", {})
    result.setdefault("markdown", "")
    if result["status"] == "failed":
        result["log_tail"] = tail
    return {"name": section.name, "budget_s": section.budget_s, "timeout_s": timeout_s, "seconds": seconds,
            "command": command, "log": log_path, **result}


def run_sections(sections: list[Section], workdir: str, data: str, total_budget_s: float) -> list[dict]:
    """Every section in order, each within min(its budget, what is left of the total); a failure never stops
    the others. Sections left with under half their budget are skipped."""
    started, results = time.perf_counter(), []
    for section in sections:
        left = total_budget_s - (time.perf_counter() - started)
        if left < 0.5 * section.budget_s:
            results.append({"name": section.name, "budget_s": section.budget_s, "timeout_s": 0, "seconds": 0.0,
                            "status": "skipped", "figures": {}, "markdown": "",
                            "reason": f"{left:.0f} s of the {total_budget_s:.0f} s total budget left, "
                                      f"under half of its {section.budget_s:.0f} s"})
            print(f"gpu-check: {section.name}: skipped ({results[-1]['reason']})", flush=True)
            continue
        timeout = min(section.budget_s, left)
        command = section_command(section, workdir, data)
        print(f"gpu-check: {section.name} (budget {timeout:.0f} s): {shlex.join(command)}", flush=True)
        os.makedirs(workdir, exist_ok=True)
        result = run_section(section, command, timeout, os.path.join(workdir, f"{section.name}.log"))
        results.append(result)
        print(f"gpu-check: {section.name}: {result['status'].upper()} in {result['seconds']:.0f} s"
              + (f" ({result['reason']})" if result["reason"] else ""), flush=True)
        if result["status"] == "failed" and result.get("log_tail"):
            print("    " + result["log_tail"].replace("\n", "\n    "), flush=True)
    return results


def report(results: list[dict], seen: dict, info: dict, command: str, seconds: float) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    failed = [r["name"] for r in results if r["status"] == "failed"]
    lines = [f"## {now}: {info.get('gpu') or 'GPU'}: {'FAILED ' + ', '.join(failed) if failed else 'passed'}", "",
             f"- GPU: {'; '.join(seen['nvidia_smi']) or info.get('gpu') or 'unknown'} (nvidia-smi name, driver, memory); "
             f"torch.cuda: {info.get('gpu')}, faiss GPUs: {seen['faiss_gpus']}",
             f"- Versions: torch {info.get('torch')} (CUDA {info.get('cuda')}), onnxruntime {info.get('onnxruntime')}, "
             f"faiss {info.get('faiss')}, Python {info.get('python')}; {os.cpu_count()} CPU cores",
             f"- Commit: {commit()}; command: `{command}`; {seconds:.0f} s in all", "",
             "| section | status | seconds (budget) | result |", "|---|---|---:|---|"]
    for r in results:
        figures = ", ".join(f"{k} {v}" for k, v in r["figures"].items() if not isinstance(v, (dict, list)))
        text = "; ".join(part for part in (r["reason"], figures) if part).replace("|", "/").replace("\n", " ")
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']:.0f} ({r['timeout_s']:.0f}) | {text} |")
    for r in results:
        if r["markdown"] or r.get("log_tail"):
            lines += ["", f"### {r['name']}", ""]
            if r["markdown"]:
                lines.append(r["markdown"].strip())
            if r.get("log_tail"):
                lines += ["", "```", r["log_tail"], "```"]
    return "\n".join(lines) + "\n"


HEADER = """# GPU check

Written by `make gpu-check` (`tests/benchmarks/gpu_check.py`): every GPU-only test and benchmark, with their
correctness checks. One dated section per run, newest last.

"""


def dry_run(sections: list[Section], workdir: str, data: str, total_budget_s: float) -> int:
    """List the sections and their commands; import each section's modules and compile its scripts."""
    problems = 0
    print(f"gpu-check --dry-run: {len(sections)} section(s), total budget {total_budget_s:.0f} s "
          f"(sum of section budgets {sum(s.budget_s for s in sections):.0f} s); data {data} "
          f"({'present' if os.path.isdir(data) else 'absent'})")
    for section in sections:
        print(f"- {section.name} (budget {section.budget_s:.0f} s): {section.what}")
        print(f"    command: {shlex.join(section_command(section, workdir, data))}")
        if section.name == "tests":
            print(f"    runs: {shlex.join(tests_command())}")
        if section.name == "vit-224px":
            methods, budget = plan_vit_runs(min(section.budget_s, total_budget_s), VIT_224_METHODS)
            for method in methods:  # with all of its budget (a full run gives it what is left, up to that)
                argv = vit_224_argv(method, os.path.join(workdir, section.name), data, budget)
                print(f"    runs: python tests/benchmarks/bench_vs_lightly.py {shlex.join(argv)}")
        for module in section.imports:
            try:
                importlib.import_module(module)
                print(f"    import {module}: ok")
            except Exception as error:  # noqa: BLE001
                problems += 1
                print(f"    import {module}: FAILED ({type(error).__name__}: {error})")
        for script in section.scripts:
            try:
                py_compile.compile(str(REPO / script), doraise=True, cfile=os.path.join(tempfile.gettempdir(), "gpu-check.pyc"))
                print(f"    compile {script}: ok")
            except (py_compile.PyCompileError, OSError) as error:
                problems += 1
                print(f"    compile {script}: FAILED ({error})")
    print("gpu-check --dry-run: " + ("everything imports and compiles" if not problems else f"{problems} problem(s)"))
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=None, help=f"append the report here (make gpu-check: {DEFAULT_OUTPUT})")
    parser.add_argument("--only", default=None, help="comma-separated sections: " + ",".join(s.name for s in SECTIONS))
    parser.add_argument("--data", default=DEFAULT_DATA, help="CIFAR-10 shards (../shared/data/cifar10)")
    parser.add_argument("--workdir", default=None, help="logs and runs (default: a fresh temporary directory)")
    parser.add_argument("--total-budget", type=float, default=TOTAL_BUDGET_S, help="seconds for all sections")
    parser.add_argument("--dry-run", action="store_true", help="list the sections and commands, check they import")
    parser.add_argument("--section", default=None, help=argparse.SUPPRESS)  # internal: run one section here
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # internal: 'cpu' smoke-tests a section
    args = parser.parse_args(argv)
    if args.section:
        return section_main(args.section, args.workdir or tempfile.mkdtemp(prefix=f"gpu-check-{args.section}-"),
                            args.data, args.device)
    sections = SECTIONS
    if args.only:
        wanted = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = sorted(set(wanted) - {s.name for s in SECTIONS})
        if unknown:
            parser.error(f"unknown section(s) {unknown}; choose from {[s.name for s in SECTIONS]}")
        sections = [s for s in SECTIONS if s.name in wanted]
    if args.dry_run:
        # Only prints the commands: name the workdir a real run would make without making it.
        return dry_run(sections, args.workdir or os.path.join(tempfile.gettempdir(), "gpu-check-XXXXXXXX"), args.data,
                       args.total_budget)
    seen = gpu_presence()
    if not seen["torch_cuda"] and seen["faiss_gpus"] == 0:
        if seen["nvidia_smi"]:
            print(f"gpu-check: FAILED: nvidia-smi lists {'; '.join(seen['nvidia_smi'])} but torch.cuda.is_available() "
                  f"is False and faiss.get_num_gpus() == 0 (driver / CUDA runtime mismatch, or CPU-only builds?)"
                  + (f" [{'; '.join(seen['errors'])}]" if seen["errors"] else ""), flush=True)
            return 1
        print(no_gpu_message(seen), flush=True)
        return 0
    workdir = args.workdir or tempfile.mkdtemp(prefix="gpu-check-")  # made only when there is a GPU to run on
    info = versions()
    print(f"gpu-check: {info.get('gpu')} ({'; '.join(seen['nvidia_smi'])}); torch {info['torch']}, onnxruntime "
          f"{info['onnxruntime']}, faiss {info['faiss']}; workdir {workdir}", flush=True)
    started = time.perf_counter()
    results = run_sections(sections, workdir, args.data, args.total_budget)
    command = "python tests/benchmarks/gpu_check.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    markdown = report(results, seen, info, command.strip(), time.perf_counter() - started)
    print("\n" + markdown, flush=True)
    if args.output:
        fresh = not os.path.exists(args.output)
        with open(args.output, "a", encoding="utf-8") as handle:
            handle.write((HEADER if fresh else "\n") + markdown)
        print(f"gpu-check: appended to {args.output}", flush=True)
    failed = [r["name"] for r in results if r["status"] == "failed"]
    print(f"gpu-check: {len(results) - len(failed)} of {len(results)} section(s) passed or skipped"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------ sections
def section_main(name: str, workdir: str, data: str, device: str) -> int:
    """Run one section in this process and print its ``GPU_CHECK_RESULT`` line."""
    functions = {"faiss": section_faiss, "onnx": section_onnx, "bf16": section_bf16, "augment": section_augment,
                 "tests": section_tests, "speed-32px": section_speed_32, "speed-224px": section_speed_224,
                 "vit-224px": section_vit_224}
    os.makedirs(workdir, exist_ok=True)
    try:
        result = {"status": "passed", "reason": "", **functions[name](workdir, data, device)}
    except Skipped as reason:
        result = {"status": "skipped", "reason": str(reason), "figures": {}, "markdown": ""}
    except CheckFailed as error:
        traceback.print_exc()
        result = {"status": "failed", "reason": f"check failed: {error}", "figures": {}, "markdown": ""}
    except Exception as error:  # noqa: BLE001 - reported as the section's failure
        traceback.print_exc()
        result = {"status": "failed", "reason": f"{type(error).__name__}: {error}"[:500], "figures": {}, "markdown": ""}
    print(RESULT_PREFIX + json.dumps(result, default=str), flush=True)
    return 1 if result["status"] == "failed" else 0


def _require_cuda(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise CheckFailed("torch.cuda.is_available() is False")


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def section_faiss(workdir: str, data: str, device: str) -> dict:
    import faiss
    import numpy as np

    from bench_index import hard_mixture, recall10
    from index import devices
    from index.build import build_arrays

    check(faiss.get_num_gpus() > 0, "faiss.get_num_gpus() == 0 (a CPU-only faiss build?)")
    base, queries = hard_mixture(200_000), hard_mixture(1000, draw_seed=2)
    cpu_flat = faiss.IndexFlatIP(base.shape[1])
    cpu_flat.add(base)
    tick = time.perf_counter()
    cpu_scores, cpu_ids = cpu_flat.search(queries, 10)
    cpu_flat_qps = len(queries) / (time.perf_counter() - tick)
    # faiss's own GPU Flat, float32 storage: the CPU's neighbours exactly.
    resources = faiss.StandardGpuResources()
    options = faiss.GpuClonerOptions()
    options.useFloat16 = False
    gpu_flat = faiss.index_cpu_to_gpu(resources, 0, cpu_flat, options)
    gpu_flat.search(queries[:10], 10)  # warm-up
    tick = time.perf_counter()
    gpu_scores, gpu_ids = gpu_flat.search(queries, 10)
    gpu_flat_qps = len(queries) / (time.perf_counter() - tick)
    score_diff = float(np.abs(gpu_scores - cpu_scores).max())
    check(score_diff <= 1e-4, f"Flat (float32 on the GPU): scores differ from the CPU's by {score_diff:.2e} > 1e-4")
    differ = gpu_ids != cpu_ids
    # A differing id is only allowed where two neighbours tie (their scores equal within 1e-4).
    untied = int(np.sum(differ & (np.abs(gpu_scores - cpu_scores) > 1e-4)))
    check(float(differ.mean()) <= 1e-3 and untied == 0,
          f"Flat (float32 on the GPU): {int(differ.sum())} of {differ.size} ids differ from the CPU's ({untied} not ties)")
    del gpu_flat
    # The project's path (index.devices.to_gpu, what Index.load and index.build use): its cloner options ask
    # for float16 storage (useFloat16), so scores move by ~1e-3 and a few 10th neighbours swap.
    served, keep_alive = devices.to_gpu(cpu_flat, True)
    check(keep_alive is not None, "index.devices.to_gpu kept the Flat index on the CPU")
    served_scores, served_ids = served.search(queries, 10)
    served_diff, served_recall = float(np.abs(served_scores - cpu_scores).max()), recall10(served_ids, cpu_ids)
    check(served_diff <= 5e-3 and served_recall >= 0.97,
          f"Flat through index.devices.to_gpu: max score diff {served_diff:.2e} (limit 5e-3), recall@10 "
          f"{served_recall:.4f} (limit 0.97)")
    del served, keep_alive

    ids = np.arange(len(base), dtype=np.int64)
    tick = time.perf_counter()
    info, cpu_ivf = build_arrays(base, None, ids=ids, factory="IVF1024,Flat", use_gpu=True)
    build_s = time.perf_counter() - tick
    check(str(info.get("device", "")).startswith("gpu"), f"index.build did not build on the GPU (device {info.get('device')})")
    params = info["search_params"]
    check(bool(info["recall"].get("reached")), f"IVF tuning on the GPU did not reach its target: {info['recall']}")
    devices.set_search_params(cpu_ivf, params)
    tick = time.perf_counter()
    cpu_found = cpu_ivf.search(queries, 10)[1]
    cpu_ivf_qps = len(queries) / (time.perf_counter() - tick)
    gpu_ivf, keep_alive = devices.to_gpu(cpu_ivf, True)
    check(keep_alive is not None, "index.devices.to_gpu kept the IVF index on the CPU")
    devices.set_search_params(gpu_ivf, params)
    gpu_ivf.search(queries[:10], 10)
    tick = time.perf_counter()
    gpu_found = gpu_ivf.search(queries, 10)[1]
    gpu_ivf_qps = len(queries) / (time.perf_counter() - tick)
    cpu_recall, gpu_recall = recall10(cpu_found, cpu_ids), recall10(gpu_found, cpu_ids)
    check(abs(cpu_recall - gpu_recall) <= 0.01,
          f"IVF1024,Flat at {params}: recall@10 on the GPU {gpu_recall:.4f} vs the CPU {cpu_recall:.4f}")
    check(gpu_recall >= info["recall"]["target"] - 0.03,
          f"IVF1024,Flat at {params}: recall@10 {gpu_recall:.4f} on fresh queries, tuned to {info['recall']['target']}")
    figures = {"flat_max_score_diff": f"{score_diff:.1e}", "flat_ids_equal": f"{1 - float(differ.mean()):.4f}",
               "flat_to_gpu_max_score_diff": f"{served_diff:.1e}", "flat_to_gpu_recall": round(served_recall, 4),
               "ivf_params": params, "ivf_recall_gpu": round(gpu_recall, 4), "ivf_recall_cpu": round(cpu_recall, 4),
               "ivf_gpu_build_s": round(build_s, 1)}
    markdown = "\n".join([
        "200,000 x 128 hard mixture (`bench_index.hard_mixture`), 1,000 fresh queries, k = 10, one batch.", "",
        "| index | device | recall@10 | queries/s |", "|---|---|---:|---:|",
        f"| Flat | CPU | 1.000 | {cpu_flat_qps:.0f} |",
        f"| Flat | GPU (float32) | {recall10(gpu_ids, cpu_ids):.3f} | {gpu_flat_qps:.0f} |",
        f"| Flat via `index.devices.to_gpu` | GPU | {served_recall:.3f} (max score diff {served_diff:.1e}) | |",
        f"| IVF1024,Flat {params} (built and tuned on the GPU in {build_s:.1f} s) | CPU | {cpu_recall:.3f} | {cpu_ivf_qps:.0f} |",
        f"| IVF1024,Flat {params} | GPU | {gpu_recall:.3f} | {gpu_ivf_qps:.0f} |"])
    return {"figures": figures, "markdown": markdown}


def _compare(got, want) -> tuple[float, float]:
    import numpy as np

    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    return float(np.abs(got - want).max()), float(cosine.min())


def section_onnx(workdir: str, data: str, device: str) -> dict:
    import numpy as np
    import onnxruntime

    import bench_onnx
    from export.runtime import CPU, CUDA, Encoder
    from trainer.data.preprocess import preprocess_batch

    check(CUDA in onnxruntime.get_available_providers(),
          f"onnxruntime has no CUDAExecutionProvider (providers: {onnxruntime.get_available_providers()})")
    _, onnx_dir, parity, _ = bench_onnx.export_for_bench("resnet18-cifar", 32, os.path.join(workdir, "export"), fp16=True)
    images, source = bench_onnx.load_images(64, data)
    cpu = Encoder(onnx_dir, providers=[CPU], precision="fp32")
    inputs = preprocess_batch(images, cpu.preprocess).astype(np.float32)
    reference = cpu.encode_batch(inputs, batch_size=64)
    rows, figures = [], {}
    for precision, io_binding, max_diff, min_cosine in (("fp32", False, 2e-3, 0.9999), ("fp32", True, 2e-3, 0.9999),
                                                         ("fp16", False, 2e-2, 0.999), ("fp16", True, 2e-2, 0.999)):
        encoder = Encoder(onnx_dir, providers=[(CUDA, {"device_id": 0}), CPU], precision=precision, io_binding=io_binding)
        check(encoder.providers[0] == CUDA, f"{precision}: ONNX Runtime runs on {encoder.providers}, not CUDA")
        out = encoder.encode_batch(inputs, batch_size=64)
        check(out.shape == reference.shape, f"{precision}: shape {out.shape} != CPU {reference.shape}")
        diff, cosine = _compare(out, reference)
        name = f"cuda-{precision}{'+iob' if io_binding else ''}"
        rows.append(f"| {name} | {diff:.1e} | {cosine:.6f} | {max_diff:g} / {min_cosine} |")
        figures[f"{name}_max_abs_diff"] = f"{diff:.1e}"
        check(diff <= max_diff and cosine >= min_cosine,
              f"{name} vs CPU: max abs diff {diff:.2e} (limit {max_diff:g}), min cosine {cosine:.6f} (limit {min_cosine})")
    throughput = bench_onnx.bench_model("resnet18-cifar", images, os.path.join(workdir, "bench"), repeats=1,
                                        threads=min(8, os.cpu_count() or 1), gpu=True)
    bench_rows = [f"| {r['batch']} | {r['side']} | {r['median_images_per_s']:.0f} | {r['ratio_to_eager']:.2f} |"
                  for r in throughput["summary"]]
    markdown = "\n".join([
        f"resnet18-cifar (random init), 32 px, {len(images)} {source}; export parity: "
        + ", ".join(f"{k} {v['max_abs_diff']:.1e}" for k, v in parity.items()), "",
        "| CUDA provider vs CPU provider (fp32) | max abs diff | min cosine | limits |", "|---|---:|---:|---|", *rows, "",
        "`bench_onnx.py` (1 repeat; CUDA sides relative to eager CUDA):", "",
        "| batch | side | images/s | ratio to eager |", "|---:|---|---:|---:|", *bench_rows])
    return {"figures": figures, "markdown": markdown}


def generated_shards(workdir: str, count: int = 1024, size: int = 32) -> str:
    """Small shards of random images in 4 classes (when the CIFAR-10 shards are absent)."""
    import numpy as np
    from PIL import Image

    from trainer.prepare import prepare

    source, output = os.path.join(workdir, "images"), os.path.join(workdir, "shards")
    rng = np.random.default_rng(0)
    for number in range(count):
        folder = os.path.join(source, f"class{number % 4}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(os.path.join(folder, f"{number}.png"))
    prepare(source, output, shard_size=256)
    return output


def _train_data(workdir: str, data: str) -> tuple[str, str]:
    if os.path.exists(os.path.join(data, "train-000001.tar.gz")):
        return os.path.join(data, "train-{000000..000001}.tar.gz"), "CIFAR-10 shards 0-1"
    shards = generated_shards(workdir)
    return os.path.join(shards, "train-*.tar*"), "generated random images (CIFAR-10 shards not found)"


def _losses(metrics_path: str) -> list[tuple[int, float]]:
    with open(metrics_path, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return [(int(r["step"]), float(r["loss"])) for r in records if "loss" in r]


def _pretrain(run: str, train_data: str, objective: str, precision: str, steps: int, batch: int, device: str,
              backbone: str = "resnet18-cifar") -> list[tuple[int, float]]:
    command = [sys.executable, str(REPO / "trainer" / "pretrain.py"), "--objective", objective, "--backbone", backbone,
               "--train-data", train_data, "--output", run, "--batch-size", str(batch), "--max-steps", str(steps),
               "--log-every", "1", "--checkpoint-every", "0", "--num-workers", str(min(4, os.cpu_count() or 1)),
               "--mixed-precision", precision, "--augment-on-device", "on", "--seed", "0"]
    env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}))
    with open(run + ".log", "w", encoding="utf-8") as log:
        code = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        with open(run + ".log", encoding="utf-8", errors="replace") as log:
            raise CheckFailed(f"{objective} {precision}: exit {code}: {shlex.join(command)}\n{log.read()[-2000:]}")
    return _losses(os.path.join(run, "metrics.jsonl"))


def section_bf16(workdir: str, data: str, device: str) -> dict:
    import torch
    from safetensors.torch import load_file

    _require_cuda(device)
    # On a CPU (``--device cpu``, a smoke test of this code only) a small model: bf16 there is emulated and slow.
    steps, batch, backbone = (30, 256, "resnet18-cifar") if device == "cuda" else (3, 16, "cnn-small")
    train_data, source = _train_data(workdir, data)
    rows, figures = [], {}
    for objective in ("simclr", "byol"):
        run = os.path.join(workdir, f"{objective}-bf16")
        losses = _pretrain(run, train_data, objective, "bf16", steps, batch, device, backbone)
        check([step for step, _ in losses] == list(range(1, steps + 1)),
              f"{objective} bf16: logged steps {[s for s, _ in losses]}, expected 1..{steps}")
        bad = [(step, loss) for step, loss in losses if not math.isfinite(loss)]
        check(not bad, f"{objective} bf16: non-finite losses at {bad[:5]}")
        weights = load_file(os.path.join(run, "model", "model.safetensors"))
        nonfinite = [name for name, tensor in weights.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
        check(not nonfinite, f"{objective} bf16: non-finite saved weights {nonfinite[:5]}")
        figures[f"{objective}_loss_first_last"] = f"{losses[0][1]:.3f}->{losses[-1][1]:.3f}"
        rows.append(f"| {objective} | bf16 | {steps} | {losses[0][1]:.4f} | {losses[-1][1]:.4f} | finite |")
    reference = _pretrain(os.path.join(workdir, "simclr-fp32"), train_data, "simclr", "no", 2, batch, device, backbone)
    bf16_first = _losses(os.path.join(workdir, "simclr-bf16", "metrics.jsonl"))[0][1]
    figures["simclr_first_loss_bf16_vs_fp32"] = f"{bf16_first:.4f} vs {reference[0][1]:.4f}"
    rows.append(f"| simclr | fp32 (reference) | 2 | {reference[0][1]:.4f} | {reference[-1][1]:.4f} | "
                f"first-step bf16 - fp32: {bf16_first - reference[0][1]:+.4f} |")
    markdown = "\n".join([f"`trainer/pretrain.py --mixed-precision bf16 --augment-on-device on`, {backbone}, batch "
                          f"{batch}, seed 0, {source}.", "",
                          "| objective | precision | steps | first loss | last loss | check |", "|---|---|---:|---:|---:|---|",
                          *rows])
    return {"figures": figures, "markdown": markdown}


def section_augment(workdir: str, data: str, device: str) -> dict:
    import torch

    import bench_augment
    from trainer.data.batched_augment import BatchedAugment, DeviceTwoViews
    from trainer.data.views import AugmentConfig

    _require_cuda(device)
    mean, std = torch.tensor(bench_augment.MEAN), torch.tensor(bench_augment.STD)
    rows, figures = [], {}
    for name, (side, size, batch, fields) in bench_augment.CONFIGS.items():
        config = AugmentConfig(**fields)
        augment = BatchedAugment(size, bench_augment.MEAN, bench_augment.STD, config)
        images = torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        on_device = images.to(device)
        out = augment(on_device, torch.Generator(device=device).manual_seed(1))
        check(out.device.type == device and out.dtype == torch.float32 and tuple(out.shape) == (batch, 3, size, size),
              f"{name}: output {out.device} {out.dtype} {tuple(out.shape)}, expected {device} float32 {(batch, 3, size, size)}")
        check(bool(torch.isfinite(out).all()), f"{name}: non-finite values")
        low, high = ((0 - mean) / std).to(out).view(1, 3, 1, 1), ((1 - mean) / std).to(out).view(1, 3, 1, 1)
        outside = float(((out < low - 1e-4) | (out > high + 1e-4)).float().mean())
        check(outside == 0.0, f"{name}: {outside:.2%} of the values lie outside the normalised [0, 1] range")
        check(float(out.flatten(1).std(1).min()) > 0, f"{name}: a constant output image")
        again = augment(on_device, torch.Generator(device=device).manual_seed(1))
        check(torch.equal(out, again), f"{name}: the same seed gave different outputs")
        params = augment.sample_params(batch, side, side, torch.Generator().manual_seed(2))
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            diff = float((augment.apply(on_device, params).cpu() - augment.apply(images, params)).abs().max())
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        check(diff < 1e-3, f"{name}: {device} and CPU differ by {diff:.2e} for the same parameters")
        views = DeviceTwoViews(size, bench_augment.MEAN, bench_augment.STD, config).on_device({"image_uint8": on_device})
        check(tuple(views["view0"].shape) == tuple(views["view1"].shape) == (batch, 3, size, size)
              and views["view0"].device.type == device, f"{name}: two-view batch {tuple(views['view0'].shape)}")
        check(not torch.equal(views["view0"], views["view1"]), f"{name}: the two views are identical")
        augment(on_device)
        _sync(device)
        calls, tick = 0, time.perf_counter()
        while calls < 5 or time.perf_counter() - tick < 2.0:
            augment(on_device)
            calls += 1
        _sync(device)
        rate = calls * batch / (time.perf_counter() - tick)
        figures[f"{name}_images_per_s"] = round(rate)
        rows.append(f"| {name} | {batch} | {size} | {diff:.1e} | {rate:.0f} |")
    markdown = ["`BatchedAugment` on random uint8 batches (`bench_augment.CONFIGS`); shape, dtype, range, determinism "
                "and two-view checks passed.", "",
                "| config | batch | px | max abs diff to CPU (TF32 off) | images/s on the GPU |", "|---|---:|---:|---:|---:|",
                *rows]
    if device == "cuda" and os.path.exists(os.path.join(data, "train-000000.tar.gz")):
        table = bench_augment.run(["--repeats", "1", "--seconds", "1", "--threads", "1", "--data", data])
        markdown += ["", "`bench_augment.py --repeats 1 --seconds 1` on CIFAR-10 images:", "",
                     *[line for line in table["markdown"].splitlines() if line.startswith("|")]]
    return {"figures": figures, "markdown": "\n".join(markdown)}


def tests_command() -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--timeout", "120", *GPU_TESTS,
            "-k", GPU_TESTS_SELECTION]


def section_tests(workdir: str, data: str, device: str) -> dict:
    _require_cuda(device)
    out = subprocess.run(tests_command(), cwd=REPO, capture_output=True, text=True)
    text = out.stdout + out.stderr
    print(text[-5000:])
    summary = next((line for line in reversed(text.splitlines()) if " in " in line and ("passed" in line or "failed" in line)), "")
    check(out.returncode == 0, f"pytest exit {out.returncode}: {summary or text[-500:]}")
    check("skipped" not in summary, f"GPU tests were skipped on a GPU machine: {summary}")
    return {"figures": {"pytest": summary.strip("= ")}, "markdown": f"`{shlex.join(tests_command()[1:])}`: {summary.strip('= ')}"}


def _speed(workdir: str, data: str, device: str, config: str, budget_s: float, sides: list[str]) -> dict:
    import bench_training_speed
    from bench_vs_lightly import _lightly_version, throughput

    _require_cuda(device)
    if not os.path.exists(os.path.join(data, "train-000004.tar.gz")):
        raise Skipped(f"CIFAR-10 shards not found at {data}")
    notes = []
    if _lightly_version() is None:
        sides = [side for side in sides if side != "lightly"]
        notes.append("lightly side skipped: lightly is not installed in .bench-site (bench_vs_lightly.py installs it "
                     "there with pip, which needs the internet; install it once, then carry .bench-site)")
        print(notes[-1], flush=True)
    output = os.path.join(workdir, "speed.md")
    argv = ["--configs", config, "--budget", str(budget_s), "--repeats", "1", "--sides", ",".join(sides), "--bf16",
            "--num-workers", str(max(2, min(8, (os.cpu_count() or 4) - 2))), "--skip-steps", "2", "--data", data,
            "--workdir", os.path.join(workdir, "runs"), "--output", output]
    check(bench_training_speed.main(argv) == 0, "bench_training_speed.py failed")
    method, backbone, size, _ = config.split(":")
    rates = {}
    for side in sides:
        metrics = os.path.join(workdir, "runs", f"r0-{method}-{backbone}-{size}-{side}", "metrics.jsonl")
        losses = _losses(metrics)
        bad = [(step, loss) for step, loss in losses if not math.isfinite(loss)]
        check(len(losses) >= 3 and not bad, f"{side}: {len(losses)} logged steps, non-finite losses {bad[:5]}")
        rates[side] = throughput(metrics, 2)[0]
    figures = {f"{side}_images_per_s": round(rate) for side, rate in rates.items()}
    for a, b in (("batched", "lightly"), ("per-image", "lightly"), ("batched", "ceiling"), ("per-image", "ceiling")):
        if a in rates and b in rates:
            figures[f"{a}/{b}"] = round(rates[a] / rates[b], 2)
    with open(output, encoding="utf-8") as handle:
        table = [line for line in handle.read().splitlines() if line.startswith("|") or line.startswith("- ")]
    return {"figures": figures, "reason": "; ".join(notes),
            "markdown": "\n".join([f"`bench_training_speed.py {shlex.join(argv[:-4])}` (every side's losses finite):",
                                   "", *table])}


def section_speed_32(workdir: str, data: str, device: str) -> dict:
    return _speed(workdir, data, device, "simclr:resnet18-cifar:32:256", 15, ["per-image", "batched", "lightly", "ceiling"])


def section_speed_224(workdir: str, data: str, device: str) -> dict:
    return _speed(workdir, data, device, "simclr:resnet50:224:64", 12, ["batched", "lightly", "ceiling"])


# vit-224px: bench_vs_lightly.py at 224 px on the GPU (issue 18: "the same at 224 px with timm:vit_small_patch16_224
# in bf16"). The method flags replace bench_vs_lightly.METHOD_ARGS (sized for the 64-wide vit-micro-cifar on a CPU):
# the recipes' heads, decoders and predictors are already ViT-S sized (384 wide, as vit_small_patch16_224) and their
# lr is kept (linear scaling to batch 64), with a 20-step warm-up so that a short run reaches its peak lr; crops the
# 32 px recipes give as 16 px (one 16 px patch here) are 96 px, the papers' size at 224 (6 x 6 patches). Checked
# valid at the 14 x 14 grid: mae (49 visible patches), ijepa (5 x 6 / 6 x 5 target blocks, 49 context patches),
# ibot (blocks of >= (14 // 3)^2 = 16 patches) and msn, on both sides.
VIT_224 = {"backbone": "timm:vit_small_patch16_224", "image_size": 224, "precision": "bf16", "batch": 64,
           "eval_limit": 256, "skip_steps": 3, "train_shards": 5}
VIT_224_METHODS = ("mae", "ibot", "ijepa")
VIT_224_METHOD_ARGS = {
    "mae": ["--warmup-steps", "20"],
    "ibot": ["--warmup-steps", "20", "--set", "local_crop_size=96", "--set", "num_local_crops=2",
             "--set", "warmup_teacher_temperature_steps=50", "--set", "freeze_last_layer_steps=0"],
    "ijepa": ["--warmup-steps", "20"],
    "msn": ["--warmup-steps", "20", "--set", "focal_crop_size=96"],  # not run by the section; valid at 224 px
}
# ``--device cpu`` (a smoke test of this code, ``tests/test_gpu_check.py``): mae only, on vit-micro-cifar at 16 px
# (a 4 x 4 grid), 2 steps, with bench_vs_lightly's own CPU flags.
VIT_224_CPU = {"backbone": "vit-micro-cifar", "image_size": 16, "precision": "bf16", "batch": 8, "eval_limit": 64,
               "skip_steps": 1, "train_shards": 5, "max_steps": 2}
VIT_224_RUN_OVERHEAD_S = 25.0  # one run's start-up, saving and kNN (on the CPU) beyond its training budget
VIT_224_RUN_S = (6.0, 20.0)    # each run's training budget: at least, at most
VIT_224_MARGIN_S = 15.0        # of the section's time, kept for its own start-up and its report


def plan_vit_runs(seconds: float, methods: tuple[str, ...], overhead_s: float = VIT_224_RUN_OVERHEAD_S,
                  run_s: tuple[float, float] = VIT_224_RUN_S,
                  margin_s: float = VIT_224_MARGIN_S) -> tuple[list[str], float]:
    """(the first methods that fit in ``seconds``, each run's training budget): two runs per method (manyview and
    lightly), each ``overhead_s`` + its budget, the budget as long as it fits up to ``run_s[1]`` but at least
    ``run_s[0]``; ``([], 0)`` when not even one method fits."""
    for count in range(len(methods), 0, -1):
        budget = (seconds - margin_s) / (2 * count) - overhead_s
        if budget >= run_s[0]:
            return list(methods[:count]), float(min(run_s[1], math.floor(budget)))
    return [], 0.0


def vit_224_argv(method: str, workdir: str, data: str, budget_s: float, device: str = "cuda",
                 num_workers: int | None = None) -> list[str]:
    """``bench_vs_lightly.py``'s arguments for one method of the vit-224px section (CPU: the smoke version)."""
    from bench_vs_lightly import METHOD_ARGS

    setup = VIT_224 if device == "cuda" else VIT_224_CPU
    extra = VIT_224_METHOD_ARGS[method] if device == "cuda" else METHOD_ARGS.get(method, [])
    workers = num_workers if num_workers is not None else max(2, min(8, (os.cpu_count() or 4) - 2))
    argv = ["--methods", method, "--backbone", setup["backbone"], "--image-size", str(setup["image_size"]),
            "--mixed-precision", setup["precision"], "--batch-size", str(setup["batch"]), "--budget", f"{budget_s:g}",
            "--repeats", "1", "--skip-steps", str(setup["skip_steps"]), "--eval-limit", str(setup["eval_limit"]),
            "--limit-train-shards", str(setup["train_shards"]), "--num-workers", str(workers), "--data", data,
            "--workdir", os.path.join(workdir, method), "--method-args", f"{method}={shlex.join(extra)}"]
    if "max_steps" in setup:
        argv += ["--max-steps", str(setup["max_steps"])]
    return argv


def _check_vit_run(run_dir: str, method: str, side: str, row: dict, setup: dict, skip_steps: int) -> None:
    """One side's run of vit-224px: every step logged with a finite loss, trained past the start-up steps, and the
    backbone, image size and precision asked for (from what the run itself recorded)."""
    name = f"{method} {side}"
    losses = _losses(os.path.join(run_dir, "metrics.jsonl"))
    check([step for step, _ in losses] == list(range(1, row["steps"] + 1)),
          f"{name}: logged steps {[s for s, _ in losses][:10]}..., expected 1..{row['steps']}")
    bad = [(step, loss) for step, loss in losses if not math.isfinite(loss)]
    check(not bad, f"{name}: non-finite losses at {bad[:5]}")
    check(row["steps"] > skip_steps and math.isfinite(row["images_per_s"]) and row["images_per_s"] > 0,
          f"{name}: {row['steps']} steps, {row['images_per_s']} images/s")
    check(0.0 <= row["knn_top1"] <= 1.0, f"{name}: kNN top-1 {row['knn_top1']}")
    with open(os.path.join(run_dir, "model", "config.json"), encoding="utf-8") as handle:
        saved = json.load(handle)
    got = (saved["model"]["backbone"], saved["model"]["image_size"])
    check(got == (setup["backbone"], setup["image_size"]), f"{name}: trained {got}, expected "
          f"{(setup['backbone'], setup['image_size'])}")
    if side == "manyview":
        with open(os.path.join(run_dir, "train_config.json"), encoding="utf-8") as handle:
            precision = json.load(handle)["mixed_precision"]
    else:
        precision = saved.get("mixed_precision")
    check(precision == setup["precision"], f"{name}: mixed precision {precision!r}, expected {setup['precision']!r}")


def section_vit_224(workdir: str, data: str, device: str) -> dict:
    from bench_vs_lightly import SIDES, _lightly_version
    from bench_vs_lightly import run as bench_run

    _require_cuda(device)
    started = time.perf_counter()
    for name in ("train-000004.tar.gz", "test-000000.tar.gz"):
        if not os.path.exists(os.path.join(data, name)):
            raise Skipped(f"CIFAR-10 shards not found at {data} (no {name})")
    if _lightly_version() is None:
        raise Skipped("lightly is not installed in .bench-site (bench_vs_lightly.py installs it there with pip, which "
                      "needs the internet; install it once, then carry .bench-site)")
    setup = VIT_224 if device == "cuda" else VIT_224_CPU
    seconds = float(os.environ.get(TIMEOUT_ENV) or next(s.budget_s for s in SECTIONS if s.name == "vit-224px"))
    methods, budget = plan_vit_runs(seconds - (time.perf_counter() - started), VIT_224_METHODS)
    if not methods:
        raise Skipped(f"{seconds:.0f} s are too few for one method (2 runs of >= {VIT_224_RUN_S[0]:.0f} s + "
                      f"{VIT_224_RUN_OVERHEAD_S:.0f} s each)")
    left_out = [m for m in VIT_224_METHODS if m not in methods]
    if device != "cuda":  # the smoke version: mae, stopped by --max-steps 2 well before this budget
        methods, budget, left_out = ["mae"], 120.0, []
    print(f"vit-224px: {methods} at {budget:.0f} s per run in the {seconds:.0f} s of this section"
          + (f"; not run for time: {left_out}" if left_out else ""), flush=True)
    figures, rows, notes, argvs, costs = {}, [], [], [], {}
    deadline, cost = started + seconds - VIT_224_MARGIN_S, 0.0
    for number, method in enumerate(methods):
        if cost and time.perf_counter() + 1.1 * cost > deadline:  # the last method's cost: the plan's estimate was low
            left_out = [m for m in VIT_224_METHODS if m not in methods[:number]]
            print(f"vit-224px: {method} would end past this section's time ({cost:.0f} s a method); stopping",
                  flush=True)
            break
        tick = time.perf_counter()
        argv = vit_224_argv(method, workdir, data, budget, device)
        argvs.append(argv)
        result = bench_run(argv)
        by_side = {row["side"]: row for row in result["rows"]}
        check(set(by_side) == set(SIDES), f"{method}: rows for {sorted(by_side)}, expected {list(SIDES)}")
        for side in SIDES:
            _check_vit_run(os.path.join(workdir, method, f"r0-{method}-{side}"), method, side, by_side[side], setup,
                           setup["skip_steps"])
        summary = result["summary"][0]
        many, light = summary["manyview"], summary["lightly"]
        figures[f"{method}_images_per_s"] = f"{many['images_per_s']:.0f} vs {light['images_per_s']:.0f}"
        figures[f"{method}_ratio"] = round(summary["throughput_ratio"], 3)
        figures[f"{method}_knn"] = f"{100 * many['knn_top1']:.2f} vs {100 * light['knn_top1']:.2f}"
        met = (("met" if summary["throughput_target_met"] else "NOT met") + " / "
               + ("met" if summary["knn_target_met"] else "NOT met"))
        rows.append(f"| {method} | {many['images_per_s']:.0f} | {light['images_per_s']:.0f} | "
                    f"{summary['throughput_ratio']:.3f} | {100 * many['knn_top1']:.2f} | "
                    f"{100 * light['knn_top1']:.2f} | {by_side['manyview']['steps']} / {by_side['lightly']['steps']} "
                    f"| {met} |")
        # What is done so far, in case the section is killed before the end (run_section keeps the last result line)
        print(RESULT_PREFIX + json.dumps({"status": "failed", "reason": f"stopped after {method}", "figures": figures}),
              flush=True)
        cost = time.perf_counter() - tick
        costs[method] = cost
    if left_out:
        notes.append(f"not run for time: {', '.join(left_out)} (run `gpu_check.py --only vit-224px` for all three)")
    flags = argvs[0][:argvs[0].index("--budget")]  # the flags every method shares, without --methods
    markdown = "\n".join([
        f"`bench_vs_lightly.py {shlex.join(flags[2:])} --budget {budget:g}` (1 repeat, images/s after "
        f"{setup['skip_steps']} steps, kNN k=200 on {setup['eval_limit']} bank / {setup['eval_limit']} query images at "
        f"{setup['image_size']} px); every logged loss finite, both sides at the backbone, size and precision asked; "
        "wall time per method (2 runs and their kNN): " + ", ".join(f"{m} {c:.0f} s" for m, c in costs.items()) + ".",
        *[f"- {m}, both sides: `{argv[argv.index('--method-args') + 1].partition('=')[2]}`"
          for m, argv in zip(methods, argvs)], "",
        "| method | images/s manyview | images/s lightly | ratio | kNN manyview | kNN lightly | steps | targets "
        "(ratio >= 1, kNN diff >= -1; reported, not checked) |", "|---|---:|---:|---:|---:|---:|---|---|", *rows])
    return {"figures": figures, "reason": "; ".join(notes), "markdown": markdown}


if __name__ == "__main__":
    sys.exit(main())
