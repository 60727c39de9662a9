"""manyview vs lightly: SimCLR, MoCo v2, BYOL, SimSiam, SwAV, DINO, Barlow Twins, VICReg, NNCLR, TiCo, DCL, DCLW,
and on a ViT (``vit-micro-cifar`` unless --backbone is given) MSN, MAE, I-JEPA and iBOT on CIFAR-10 for the same
wall-clock budget, side by side in one run.

For each repeat and method, one manyview run (``trainer/pretrain.py``) and one lightly run
(``tests/benchmarks/lightly_side.py``, in its own process with lightly from ``.bench-site``) train the same
backbone (resnet18-cifar by default) at batch 256 with the recipe's hyper-parameters, the same LR schedule over
the nominal ``--max-steps`` and the same stopping rule (``--budget`` seconds of training). The two sides are interleaved
(their order alternates between repeats) because this machine's speed drifts between runs; the summary
quotes medians and manyview/lightly ratios.

Measured identically on both sides:
* training images/s: from the per-step ``metrics.jsonl`` records (wall time after each step), the images of
  steps ``skip+1..last`` over the time between the end of step ``skip`` and the end of the last step, so
  start-up (process, data workers, the first steps) is excluded;
* kNN top-1 (k=200, tau=0.1): ``trainer.evaluate.evaluate`` on the saved backbone (bank: train shards 0-1,
  queries: test shard 0), in this process, the same code for both sides.

Per-method manyview flags (``METHOD_ARGS``, replaced with ``--method-args METHOD=ARGS``) go to both sides: the
lightly side applies them to the same recipe with manyview's own config code. The ViT methods run with AdamW at
lr 4e-3, weight decay 0.05, 10 warm-up steps and heads / decoders / predictors sized for the 64-wide ViT.
``--image-size N`` and ``--mixed-precision no|bf16|fp16`` go to both sides too (manyview's own flags; the lightly
side makes its views at that size with lightly's transforms and autocasts on the training device as manyview's
loop does: fp16 with a gradient scaler, bf16 without). ``make gpu-check``'s ``vit-224px`` section runs mae, ibot
and ijepa this way with ``--backbone timm:vit_small_patch16_224 --image-size 224 --mixed-precision bf16``.

    python tests/benchmarks/bench_vs_lightly.py --budget 600 --repeats 1 --output tests/benchmarks/RESULTS.md
    python tests/benchmarks/bench_vs_lightly.py --methods mae,ijepa,ibot --budget 300 --max-steps 20 --repeats 3

lightly is installed on first use into ``.bench-site`` (``pip install --no-deps --target``), never into the venv.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

BENCH_SITE = os.path.join(REPO, ".bench-site")
LIGHTLY_PACKAGES = ["lightly", "hydra-core", "omegaconf", "antlr4-python3-runtime==4.9.3", "pytorch_lightning",
                    "lightning-utilities", "torchmetrics"]
DEFAULT_DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "cifar10")
METHODS = ("simclr", "moco2", "byol", "simsiam", "swav", "dino", "barlow_twins", "vicreg", "nnclr", "tico", "dcl", "dclw",
           "msn", "mae", "ijepa", "ibot")
SIDES = ("manyview", "lightly")
DEFAULT_BACKBONE = "resnet18-cifar"
# The ViT methods' backbone when --backbone is not given (an explicit --backbone applies to every method).
METHOD_BACKBONE = {"msn": "vit-micro-cifar", "mae": "vit-micro-cifar", "ijepa": "vit-micro-cifar",
                   "ibot": "vit-micro-cifar"}
# manyview flags given to BOTH sides of a method, after the common ones (--method-args METHOD=ARGS replaces a
# method's entry). The lightly side applies them to the same recipe with manyview's own config code
# (lightly_side.RECIPE_FLAGS lists the flags it takes), so the two sides train the same hyper-parameters. Sized for
# the ViT methods on a 2-core CPU: the recipes' vit-small-cifar schedules (lr for 1000 warm-up steps, heads and
# decoders for a 384-wide ViT) scaled to vit-micro-cifar (64 wide) and a run of tens of steps.
VIT_CPU_ARGS = ["--optimizer", "adamw", "--lr", "4e-3", "--weight-decay", "0.05", "--warmup-steps", "10"]
METHOD_ARGS: dict[str, list[str]] = {
    "mae": [*VIT_CPU_ARGS, "--set", "decoder_width=64", "--set", "decoder_depth=2", "--set", "decoder_heads=2"],
    "ijepa": [*VIT_CPU_ARGS, "--set", "predictor_dim=64", "--set", "predictor_depth=2", "--set", "predictor_heads=2"],
    # patch_center=masked: lightly's IBOTPatchLoss centres over the masked patches and runs the teacher's patch head
    # on those only; manyview's default (the authors' code) runs it on every patch.
    "ibot": [*VIT_CPU_ARGS, "--set", "out_dim=256", "--set", "patch_out_dim=256", "--set", "num_local_crops=2",
             "--set", "warmup_teacher_temperature_steps=50", "--set", "freeze_last_layer_steps=0",
             "--set", "patch_center=masked"],
}


def ensure_lightly(python: str = sys.executable) -> str:
    """lightly's version in ``.bench-site``, installing it there (without touching the venv) when missing."""
    if not _lightly_version():
        print(f"installing lightly into {BENCH_SITE}", flush=True)
        subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--target", BENCH_SITE, *LIGHTLY_PACKAGES],
                       check=True)
    version = _lightly_version()
    if not version:
        raise RuntimeError(f"lightly is not importable from {BENCH_SITE} after installing it")
    return version


def _lightly_version() -> str | None:
    from importlib.metadata import distributions

    for dist in distributions(path=[BENCH_SITE]):
        if (dist.metadata["Name"] or "").lower() == "lightly" and os.path.isdir(os.path.join(BENCH_SITE, "lightly")):
            return dist.version
    return None


def machine_description() -> dict:
    import torch

    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "python": platform.python_version(), "host": platform.node()}


def _subprocess_env(with_lightly: bool) -> dict:
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.abspath(p) != BENCH_SITE]
    if with_lightly:
        paths.insert(0, BENCH_SITE)
    env["PYTHONPATH"] = os.pathsep.join([REPO, *paths])
    env.setdefault("TQDM_MININTERVAL", "30")  # keep the logs short
    return env


def backbone_for(method: str, args: argparse.Namespace) -> str:
    """--backbone when given, else the method's (``METHOD_BACKBONE``: a ViT for the ViT-only methods), else
    resnet18-cifar."""
    return getattr(args, "backbone", None) or METHOD_BACKBONE.get(method, DEFAULT_BACKBONE)


def method_args(method: str, args: argparse.Namespace) -> list[str]:
    """The extra manyview flags both sides of ``method`` get: --method-args' entry, else ``METHOD_ARGS``'."""
    given = getattr(args, "method_args", None) or {}
    return list(given[method]) if method in given else list(METHOD_ARGS.get(method, []))


def precision_and_size(args: argparse.Namespace) -> list[str]:
    """``--mixed-precision`` (always) and ``--image-size`` (when given; else each side reads the recipe's), the same
    flags with the same values on both sides: manyview's ``trainer/pretrain.py`` and ``lightly_side.py`` take both."""
    flags = ["--mixed-precision", getattr(args, "mixed_precision", None) or "no"]
    if getattr(args, "image_size", None):
        flags += ["--image-size", str(args.image_size)]
    return flags


def train_command(side: str, method: str, args: argparse.Namespace, train_data: str, run_dir: str, max_steps: int) -> list[str]:
    common = ["--train-data", train_data, "--output", run_dir, "--batch-size", str(args.batch_size),
              "--max-steps", str(max_steps), "--time-budget", str(args.budget), "--num-workers", str(args.num_workers),
              "--seed", str(args.seed), *precision_and_size(args)]
    backbone, extra = backbone_for(method, args), method_args(method, args)
    if side == "manyview":
        return [sys.executable, os.path.join(REPO, "trainer", "pretrain.py"), "--objective", method,
                "--backbone", backbone, "--checkpoint-every", "0", "--log-every", "1", *common, *extra]
    return [sys.executable, os.path.join(REPO, "tests", "benchmarks", "lightly_side.py"), "--method", method,
            "--backbone", backbone, *common, *extra]


def throughput(metrics_path: str, skip_steps: int) -> tuple[float, int]:
    """(images/s after the first ``skip_steps`` steps, steps trained) from per-step metrics records.

    The clock runs from the end of step ``skip_steps`` (at least 1: records are stamped when a step ends) to
    the end of the last step, so process and data-worker start-up and the first steps are left out.
    """
    records = []
    with open(metrics_path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                records.append(json.loads(line))
    by_step = {int(r["step"]): r for r in records}
    steps = int(records[-1]["step"]) if records else 0
    skip_steps = max(1, skip_steps)
    if steps < skip_steps + 1 or skip_steps not in by_step:
        raise RuntimeError(f"{metrics_path}: {steps} step(s) are too few to leave out {skip_steps} start-up step(s); "
                           f"raise --budget or lower --skip-steps")
    first, last = by_step[skip_steps], records[-1]
    return (last["images_seen"] - first["images_seen"]) / max(last["time"] - first["time"], 1e-9), steps


def run_one(side: str, method: str, repeat: int, args: argparse.Namespace, train_data: str, max_steps: int) -> dict:
    from trainer.evaluate import evaluate

    run_dir = os.path.join(args.workdir, f"r{repeat}-{method}-{side}")
    if os.path.exists(run_dir):
        import shutil

        shutil.rmtree(run_dir)
    os.makedirs(run_dir)
    command = train_command(side, method, args, train_data, run_dir, max_steps)
    log_path = os.path.join(run_dir, "train.log")
    print(f"[repeat {repeat}] {method:6s} {side:8s} training ({args.budget:.0f} s budget) ... log: {log_path}", flush=True)
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        code = subprocess.run(command, cwd=REPO, env=_subprocess_env(side == "lightly"), stdout=log,
                              stderr=subprocess.STDOUT).returncode
    train_wall = time.perf_counter() - started
    if code != 0:
        with open(log_path, encoding="utf-8") as log:
            tail = log.read()[-3000:]
        raise RuntimeError(f"{side} {method} training failed (exit {code}): {shlex.join(command)}\n{tail}")
    images_per_s, steps = throughput(os.path.join(run_dir, "metrics.jsonl"), args.skip_steps)
    started = time.perf_counter()
    result = evaluate(os.path.join(run_dir, "model"), args.bank_data, args.query_data, knn_k=200, knn_temperature=0.1,
                      num_workers=args.num_workers, limit_train=args.eval_limit, limit_test=args.eval_limit)
    eval_wall = time.perf_counter() - started
    row = {"repeat": repeat, "method": method, "side": side, "steps": steps, "images_per_s": images_per_s,
           "knn_top1": result["knn_top1"], "bank": result["train_samples"], "queries": result["test_samples"],
           "train_wall_s": round(train_wall, 1), "eval_wall_s": round(eval_wall, 1)}
    print(f"[repeat {repeat}] {method:6s} {side:8s} steps={steps} images/s={images_per_s:.1f} "
          f"kNN={row['knn_top1']:.4f} (train {train_wall:.0f} s, eval {eval_wall:.0f} s)", flush=True)
    return row


def summarise(rows: list[dict], methods: list[str]) -> list[dict]:
    """Per method: medians of each side, manyview/lightly throughput ratio, kNN difference, targets met."""
    summary = []
    for method in methods:
        medians = {}
        for side in SIDES:
            mine = [r for r in rows if r["method"] == method and r["side"] == side]
            medians[side] = {"images_per_s": statistics.median(r["images_per_s"] for r in mine),
                             "knn_top1": statistics.median(r["knn_top1"] for r in mine)}
        ratio = medians["manyview"]["images_per_s"] / medians["lightly"]["images_per_s"]
        knn_diff = medians["manyview"]["knn_top1"] - medians["lightly"]["knn_top1"]
        summary.append({"method": method, "manyview": medians["manyview"], "lightly": medians["lightly"],
                        "throughput_ratio": ratio, "knn_diff_points": 100 * knn_diff,
                        "throughput_target_met": ratio >= 1.0, "knn_target_met": knn_diff >= -0.01})
    return summary


def report_markdown(rows: list[dict], summary: list[dict], machine: dict, args: argparse.Namespace, command: str,
                    lightly_version: str, max_steps: int, total_s: float) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    size = f"{args.image_size} px" if args.image_size else "the recipe's image size"
    lines = [
        f"## {now}: budget {args.budget:.0f} s per run, {args.repeats} repeat(s)",
        "",
        f"- Machine: {machine['cores']} cores, {machine['cpu']}, {machine['gpu']}; torch {machine['torch']}, "
        f"Python {machine['python']}, lightly {lightly_version}",
        f"- Command: `{command}` ({total_s / 60:.0f} min in all)",
        f"- Each run: {_backbones_text(args)} at {size}, mixed precision {args.mixed_precision}, batch "
        f"{args.batch_size}, {args.num_workers} data workers, LR schedule "
        f"over a nominal {max_steps} steps, stopped after {args.budget:.0f} s of training; images/s excludes the first "
        f"{args.skip_steps} steps; kNN k=200 t=0.1, bank {rows[0]['bank']} train images (shards 0-1), "
        f"{rows[0]['queries']} queries (test shard 0)" + (" (--eval-limit)" if args.eval_limit else "")
        + f"; train shards used: {args.limit_train_shards}.",
        *[f"- {method}, both sides: `{shlex.join(method_args(method, args))}`" for method in args.methods
          if method_args(method, args)],
        "",
        "| repeat | method | side | steps | images/s | kNN top-1 |",
        "|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['repeat']} | {r['method']} | {r['side']} | {r['steps']} | {r['images_per_s']:.1f} | "
                     f"{100 * r['knn_top1']:.2f} |")
    lines += ["", "| method | images/s manyview | images/s lightly | ratio | kNN manyview | kNN lightly | "
              "kNN diff (points) | targets (ratio >= 1, diff >= -1) |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for s in summary:
        met = ("met" if s["throughput_target_met"] else "NOT met") + " / " + ("met" if s["knn_target_met"] else "NOT met")
        lines.append(f"| {s['method']} | {s['manyview']['images_per_s']:.1f} | {s['lightly']['images_per_s']:.1f} | "
                     f"{s['throughput_ratio']:.3f} | {100 * s['manyview']['knn_top1']:.2f} | "
                     f"{100 * s['lightly']['knn_top1']:.2f} | {s['knn_diff_points']:+.2f} | {met} |")
    lines.append("")
    return "\n".join(lines)


def _backbones_text(args: argparse.Namespace) -> str:
    """The backbone of every method of the run, e.g. "resnet18-cifar (simclr), vit-micro-cifar (mae, ibot)"."""
    by_backbone: dict[str, list[str]] = {}
    for method in args.methods:
        by_backbone.setdefault(backbone_for(method, args), []).append(method)
    if len(by_backbone) == 1:
        return next(iter(by_backbone))
    return ", ".join(f"{backbone} ({', '.join(methods)})" for backbone, methods in by_backbone.items())


RESULTS_HEADER = """# manyview vs lightly: equal wall-clock training

Written by `tests/benchmarks/bench_vs_lightly.py` (one dated section per run, newest last). Both sides train
resnet18-cifar at batch 256 with the hyper-parameters and augmentation of `trainer/recipes/<method>.yaml`;
lightly's side follows lightly's own examples (`tests/benchmarks/lightly_side.py`). Medians over repeats;
ratio = manyview / lightly images/s; kNN diff = manyview - lightly in points. Targets: ratio >= 1 and
kNN diff >= -1 point. Known differences that are each library's own way: manyview's moco2 uses shuffling BN
(8 groups, as in the paper), lightly's MoCo example plain BN; manyview's BYOL loss is the paper's
(2 - 2 cos) summed over both directions, lightly's example -cos averaged (a 4x smaller gradient where LARS
does not rescale it: biases and norms); lightly's DINO/SwAV examples count warm-up and freezing in epochs,
given here in steps on both sides.

"""


def write_results(path: str, section: str) -> None:
    fresh = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", encoding="utf-8") as handle:
        if fresh:
            handle.write(RESULTS_HEADER)
        handle.write(section + "\n")


def default_max_steps(budget: float) -> int:
    """A nominal schedule length about as long as the budget allows (the same on both sides): roughly
    10 s a step on a 2-core CPU, 0.05 s on a GPU, so the cosine decays over about the steps that are run."""
    import torch

    seconds_per_step = 0.05 if torch.cuda.is_available() else 10.0
    return max(20, math.ceil(budget / seconds_per_step))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_vs_lightly", description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=600, help="seconds of training per run")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--max-steps", type=int, help="nominal LR-schedule length (default: from the budget)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--backbone", help="the same on both sides and for every method (cnn-small: many more "
                        "steps per budget on a CPU, so kNN is past its floor); default: resnet18-cifar, and "
                        "vit-micro-cifar for " + ", ".join(METHOD_BACKBONE))
    parser.add_argument("--method-args", action="append", default=[], metavar="METHOD=ARGS",
                        help="manyview flags for both sides of METHOD, replacing its defaults (METHOD_ARGS), e.g. "
                        "'mae=--lr 1e-3 --set decoder_width=128'; '' gives none; repeatable")
    parser.add_argument("--image-size", type=int, help="training image size on both sides (default: the recipe's, "
                        "32); the saved model, and so kNN, uses it too")
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no",
                        help="autocast on the training device on both sides (fp16 with a gradient scaler)")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-steps", type=int, default=3, help="start-up steps left out of images/s (>= 1)")
    parser.add_argument("--data", default=DEFAULT_DATA, help="directory of the CIFAR-10 shards")
    parser.add_argument("--limit-train-shards", type=int, default=10, help="train on shards 0..N-1 only")
    parser.add_argument("--eval-limit", type=int, help="at most N bank and N query images (smoke tests)")
    parser.add_argument("--workdir", default="/tmp/manyview-bench", help="run directories")
    parser.add_argument("--output", help="append the results section to this Markdown file")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown or not args.methods:
        parser.error(f"--methods: choose from {', '.join(METHODS)}, got {unknown or 'none'}")
    if args.image_size is not None and args.image_size < 1:
        parser.error("--image-size must be positive")
    if not 1 <= args.limit_train_shards <= 10:
        parser.error("--limit-train-shards must be in 1..10")
    given = {}
    for item in args.method_args:
        method, sep, text = item.partition("=")
        if not sep or method.strip() not in METHODS:
            parser.error(f"--method-args expects METHOD=ARGS with METHOD one of {', '.join(METHODS)}, got {item!r}")
        given[method.strip()] = shlex.split(text)
    args.method_args = given
    args.bank_data = os.path.join(args.data, "train-{000000..000001}.tar.gz")
    args.query_data = os.path.join(args.data, "test-000000.tar.gz")
    return args


def run(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns {"rows", "summary", "machine", "markdown"} (and writes --output if given)."""
    import warnings

    warnings.filterwarnings("ignore", module="webdataset")
    args = parse_args(argv)
    command = "python tests/benchmarks/bench_vs_lightly.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    lightly_version = ensure_lightly()
    train_data = os.path.join(args.data, f"train-{{000000..{args.limit_train_shards - 1:06d}}}.tar.gz")
    max_steps = args.max_steps or default_max_steps(args.budget)
    os.makedirs(args.workdir, exist_ok=True)
    machine = machine_description()
    print(f"benchmark: {args.methods} x {args.repeats} repeat(s), {args.budget:.0f} s per run, nominal {max_steps} steps; "
          f"{machine['cores']} cores {machine['cpu']}, {machine['gpu']}", flush=True)
    started = time.perf_counter()
    rows = []
    for repeat in range(args.repeats):
        order = SIDES if repeat % 2 == 0 else SIDES[::-1]  # alternate who goes first: drift hits both alike
        for method in args.methods:
            for side in order:
                rows.append(run_one(side, method, repeat, args, train_data, max_steps))
    total_s = time.perf_counter() - started
    summary = summarise(rows, args.methods)
    markdown = report_markdown(rows, summary, machine, args, command, lightly_version, max_steps, total_s)
    with open(os.path.join(args.workdir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump({"rows": rows, "summary": summary, "machine": machine, "command": command}, handle, indent=2)
    print("\n" + markdown, flush=True)
    if args.output:
        write_results(args.output, markdown)
        print(f"appended to {args.output}", flush=True)
    return {"rows": rows, "summary": summary, "machine": machine, "markdown": markdown}


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
