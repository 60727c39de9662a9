"""The kNN table: every objective trained for the same budget on the same CIFAR-10 data, against its
random-init floor, so users see how the objectives compare (and which learn at all in a short run).

Each objective trains ``cnn-small`` at batch 64 for ``--steps`` steps on 2,000 CIFAR-10 training images (shards
0 of the shared set, re-sharded by 1,000), then weighted kNN top-1 (k=200, t=0.1) over those 2,000 as the bank
and 2,000 test images as queries; the floor is the same command with ``--max-steps 0`` (same seed: the same
initial weights). Options are the recipes' with what a 32 px, 64-image batch, few-hundred-step run needs
(AdamW, short warm-up, smaller heads): the same for every objective where it applies, listed in ``SETTINGS``.

    python tests/benchmarks/bench_learning.py --steps 300 --output tests/benchmarks/RESULTS_learning.md
    python tests/benchmarks/bench_learning.py --steps 1000 --only byol,simsiam,dino --output ...
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))

from learning_helpers import scores_after  # noqa: E402

ADAMW = ["--optimizer", "adamw", "--lr", "4e-3", "--weight-decay", "1e-4", "--warmup-steps", "10"]
TEXT = "text={width: 64, heads: 2, layers: 1, context_length: 16}"
VIT_MICRO = [*ADAMW, "--backbone", "vit-micro-cifar", "--weight-decay", "0.05"]
# dino's short-run settings (below), for the DINO-family ViT objectives.
DINO_SHORT = ["--set", "out_dim=256", "--set", "num_local_crops=2", "--set", "warmup_teacher_temperature_steps=50",
              "--set", "freeze_last_layer_steps=0"]

# objective -> (paper family, extra arguments). Learning rates are per 256 images (the loop scales by 64/256).
SETTINGS: dict[str, tuple[str, list[str]]] = {
    "simclr": ("contrastive", ADAMW),
    "simclr2": ("contrastive", ADAMW),
    "moco": ("contrastive", [*ADAMW, "--set", "queue_size=1024"]),
    "moco2": ("contrastive", [*ADAMW, "--set", "queue_size=1024", "--set", "projection_hidden_dim=256"]),
    "moco3": ("contrastive", [*ADAMW, "--set", "projection_hidden_dim=256", "--set", "predictor_hidden_dim=256"]),
    "instdisc": ("contrastive", [*ADAMW, "--set", "proximal_weight=3", "--set", "normaliser_warmup_steps=32"]),
    "invaspread": ("contrastive", ADAMW),
    "cmc": ("contrastive", ADAMW),
    "curl": ("contrastive", ADAMW),
    "supcon": ("supervised contrastive", [*ADAMW, "--set", "projection_hidden_dim=128"]),
    "align_uniform": ("contrastive", [*ADAMW, "--set", "projection_hidden_dim=128"]),
    "clip": ("image-text", ["--lr", "4e-3", "--set", TEXT]),
    "siglip": ("image-text", ["--lr", "4e-3", "--set", TEXT]),
    # CoCa's towers are sized from the ViT name (vit-micro-cifar: width 64); text and decoder one layer each.
    "coca": ("image-text", [*VIT_MICRO, "--lr", "2e-3", "--set", "embed_dim=64", "--set", "context_length=16",
                            "--set", "text_layers=1", "--set", "decoder_layers=1", "--set", "text_heads=2",
                            "--set", "image_queries=16", "--set", "pooler_heads=2"]),
    "cpc": ("predictive", [*ADAMW, "--lr", "8e-3", "--set", "patch=16", "--set", "stride=8", "--set", "prediction_steps=2",
                           "--set", "context_layers=1", "--set", "context_hidden_dim=64", "--set", "target_dim=64"]),
    "cpc2": ("predictive", [*ADAMW, "--lr", "8e-3", "--set", "patch=16", "--set", "stride=8", "--set", "prediction_steps=2",
                            "--set", "skip_steps=0", "--set", "context_layers=1", "--set", "context_hidden_dim=64",
                            "--set", "target_dim=64", "--set", "prediction_scale=1.0", "--set", "colour_drop=0.5"]),
    "byol": ("non-contrastive", ADAMW),
    "simsiam": ("non-contrastive", ADAMW),
    "barlow_twins": ("non-contrastive", [*ADAMW, "--lr", "3e-3", "--set", "projection_dim=512",
                                         "--set", "projection_hidden_dim=512"]),
    "swav": ("clustering", [*ADAMW, "--lr", "8e-3", "--set", "num_prototypes=64", "--set", "projection_hidden_dim=256",
                            "--set", "num_local_crops=0", "--set", "freeze_prototypes_steps=0", "--set", "queue_length=0",
                            "--set", "global_crop_scale=[0.3, 1.0]"]),
    "dino": ("clustering / distillation", [*ADAMW, "--set", "out_dim=256", "--set", "num_local_crops=2",
                                            "--set", "warmup_teacher_temperature_steps=50", "--set", "freeze_last_layer_steps=0"]),
    "pixpro": ("dense", [*ADAMW, "--lr", "2e-3", "--set", "projection_hidden_dim=256", "--set", "mode=pixcontrast",
                         "--set", "batch_negatives=true"]),
    "patchnce": ("dense", [*ADAMW, "--lr", "2e-3"]),
    "exemplar": ("pretext", [*ADAMW, "--set", "seed_patch=28", "--set", "num_copies=2"]),
    "context": ("pretext", [*ADAMW, "--set", "puzzle_size=32", "--set", "tile=9", "--set", "gap=2", "--set", "jitter=1"]),
    "jigsaw": ("pretext", [*ADAMW, "--set", "num_permutations=24", "--set", "puzzle_size=48", "--set", "tile=14",
                           "--set", "gap=2", "--set", "jitter=1", "--set", "per_tile_normalisation=false"]),
    "colorization": ("pretext", [*ADAMW, "--lr", "3e-3"]),
    "counting": ("pretext", [*ADAMW, "--lr", "2e-3", "--warmup-steps", "20", "--set", "jitter_each=0.8",
                             "--set", "negatives=batch"]),
    "rotation": ("pretext", ADAMW),
    "jigsaw_clustering": ("pretext", [*ADAMW, "--lr", "3e-3"]),
    "multitask": ("multi-task (rotation + simclr)", [*ADAMW, "--lr", "3e-3"]),
    # -- issue 17: joint-embedding and dense methods of lightly and solo-learn
    "lejepa": ("non-contrastive", [*ADAMW, "--set", "projection_hidden_dim=256", "--set", "num_local_crops=2",
                                   "--set", "num_slices=256"]),
    "visreg": ("non-contrastive", [*ADAMW, "--set", "projection_hidden_dim=256", "--set", "num_local_crops=2",
                                   "--set", "num_slices=1024", "--set", "lambd=0.6"]),
    "densecl": ("dense", [*ADAMW, "--set", "queue_size=1024", "--set", "projection_hidden_dim=256"]),
    "detcon_s": ("dense", [*ADAMW, "--set", "projection_hidden_dim=256", "--set", "num_masks=8"]),
    "detcon_b": ("dense", [*ADAMW, "--set", "projection_hidden_dim=256", "--set", "predictor_hidden_dim=256",
                           "--set", "num_masks=8"]),
    "paka": ("dense", [*ADAMW, "--lr", "2e-3", "--set", "grid_size=4"]),
    "vicreg": ("non-contrastive", [*ADAMW, "--lr", "3e-3", "--set", "projection_dim=512",
                                   "--set", "projection_hidden_dim=512"]),
    "vicregl": ("non-contrastive / dense", [*ADAMW, "--lr", "3e-3", "--set", "projection_dim=512",
                                             "--set", "projection_hidden_dim=512", "--set", "map_projection_dim=256",
                                             "--set", "map_projection_hidden_dim=256", "--set", "num_local_crops=2"]),
    "vibcreg": ("non-contrastive", [*ADAMW, "--lr", "3e-3", "--set", "projection_dim=512",
                                    "--set", "projection_hidden_dim=512"]),
    "tico": ("non-contrastive", [*ADAMW, "--set", "projection_hidden_dim=512"]),
    "dcl": ("contrastive", ADAMW),
    "dclw": ("contrastive", ADAMW),
    "macl": ("contrastive", ADAMW),
    "directclr": ("contrastive", ADAMW),
    "ressl": ("relational", [*ADAMW, "--set", "queue_size=1024", "--set", "projection_hidden_dim=512",
                             "--set", "projection_dim=128"]),
    "co2": ("contrastive", [*ADAMW, "--set", "queue_size=1024", "--set", "projection_hidden_dim=256"]),
    "deepcluster_v2": ("clustering", [*ADAMW, "--set", "num_prototypes=[64, 64, 64]",
                                      "--set", "projection_hidden_dim=256", "--set", "num_local_crops=0",
                                      "--set", "global_crop_scale=[0.3, 1.0]"]),
    "smog": ("clustering", [*ADAMW, "--set", "num_groups=64", "--set", "memory_size=2048",
                            "--set", "reset_every_steps=100", "--set", "projection_hidden_dim=256",
                            "--set", "predictor_hidden_dim=256"]),
    "fastsiam": ("non-contrastive", ADAMW),
    "nnclr": ("contrastive", [*ADAMW, "--set", "queue_size=1024", "--set", "projection_hidden_dim=256",
                              "--set", "predictor_hidden_dim=256"]),
    "nnbyol": ("non-contrastive", [*ADAMW, "--set", "queue_size=1024"]),
    "nnsiam": ("non-contrastive", [*ADAMW, "--set", "queue_size=1024", "--set", "predictor_hidden_dim=512"]),
    "all4one": ("contrastive", [*ADAMW, "--set", "queue_size=1024", "--set", "projection_hidden_dim=256",
                                "--set", "predictor_hidden_dim=256"]),
    # mmcr's and emp_ssl's recipes set scale_lr: false (the papers' lr at their own batch): --lr is the effective lr.
    "mmcr": ("non-contrastive", [*ADAMW, "--lr", "1e-3", "--set", "num_views=4", "--set", "projection_hidden_dim=256"]),
    "wmse": ("non-contrastive", [*ADAMW, "--set", "num_views=2", "--set", "projection_dim=32",
                                 "--set", "projection_hidden_dim=256", "--set", "w_size=64"]),
    "frossl": ("non-contrastive", [*ADAMW, "--set", "projection_dim=512", "--set", "projection_hidden_dim=512"]),
    "emp_ssl": ("non-contrastive", [*ADAMW, "--lr", "1e-3", "--set", "num_patches=4", "--set", "projection_dim=256",
                                    "--set", "projection_hidden_dim=512"]),
    # MSN/PMSN need a ViT: this --backbone comes after scores_after's cnn-small and wins (vit-micro-cifar, width 64,
    # depth 2, patch 4: about cnn-small's cost per step).
    "msn": ("clustering / masked ViT (vit-micro-cifar)", [*ADAMW, "--backbone", "vit-micro-cifar",
                                                          "--weight-decay", "0.04", "--grad-clip", "3.0",
                                                          "--set", "num_prototypes=64", "--set", "projection_hidden_dim=256",
                                                          "--set", "num_focal_views=4", "--set", "momentum=0.99"]),
    "pmsn": ("clustering / masked ViT (vit-micro-cifar)", [*ADAMW, "--backbone", "vit-micro-cifar",
                                                           "--weight-decay", "0.04", "--grad-clip", "3.0",
                                                           "--set", "num_prototypes=64",
                                                           "--set", "projection_hidden_dim=256",
                                                           "--set", "num_focal_views=4", "--set", "momentum=0.99"]),
    # Issue 18's ViT objectives, on vit-micro-cifar as msn; smaller decoders / heads / prototypes for its width 64.
    # The reconstruction objectives are judged by a linear probe as much as kNN: run them with --linear.
    "mae": ("masked image modelling (vit-micro-cifar)", [*VIT_MICRO, "--set", "decoder_width=64",
                                                         "--set", "decoder_depth=2", "--set", "decoder_heads=2"]),
    "simmim": ("masked image modelling (vit-micro-cifar)", [*VIT_MICRO]),
    "aim": ("autoregressive (vit-micro-cifar)", [*VIT_MICRO, "--set", "head_blocks=2", "--set", "head_hidden_dim=128"]),
    "ibot": ("distillation / masked ViT (vit-micro-cifar)", [*VIT_MICRO, *DINO_SHORT, "--set", "patch_out_dim=256"]),
    "dinov2": ("distillation / masked ViT (vit-micro-cifar)", [*VIT_MICRO, *DINO_SHORT, "--set", "patch_out_dim=256"]),
    "ijepa": ("predictive / masked ViT (vit-micro-cifar)", [*VIT_MICRO, "--set", "predictor_dim=64",
                                                            "--set", "predictor_depth=2", "--set", "predictor_heads=2"]),
    "capi": ("clustering / masked ViT (vit-micro-cifar)", [*VIT_MICRO, "--set", "num_clusters=256",
                                                           "--set", "predictor_depth=2"]),
}


def prepare_shards(workdir: Path, data: str) -> Path:
    from trainer.prepare import prepare

    shards = workdir / "cifar-2k"
    if not (shards / "manifest.json").exists():
        prepare(f"{data}/train-000000.tar.gz::{data}/test-000000.tar.gz", str(shards), shard_size=1000, limit=2000)
    return shards


# What a row's numbers depend on besides its arguments: the training code and the train-then-kNN helper.
CODE_PATHS = ("trainer", "tests/learning_helpers.py")


def code_key(repo: Path | str | None = None, paths: tuple[str, ...] = CODE_PATHS) -> str | None:
    """The commit that last changed ``paths`` (``git log -1 --format=%H -- PATHS``), or ``None`` when that cannot
    vouch for the code: uncommitted or untracked changes under ``paths``, or no git checkout. ``None`` never reuses."""
    import subprocess

    repo = str(repo or HERE.parent.parent)
    try:
        commit = subprocess.run(["git", "log", "-1", "--format=%H", "--", *paths], cwd=repo, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", *paths], cwd=repo,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit if commit and not dirty else None


def reuse_key(objective_args: list[str], steps: int, code: str | None) -> dict | None:
    """What a saved row must match to be reused: the same arguments, steps and committed code (``None``: never)."""
    return None if code is None else {"args": list(objective_args), "steps": int(steps), "code": code}


def reusable(row: dict, key: dict | None) -> bool:
    """A saved row is reused only under the same key; rows saved before the key existed (no ``reuse_key``) never."""
    return key is not None and row.get("reuse_key") == key


def source_version() -> str:
    """The git commit of the checkout, with "+dirty" when trainer/ has uncommitted changes."""
    import subprocess

    repo = HERE.parent.parent
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "trainer"], cwd=repo, capture_output=True, text=True).stdout
    return commit + ("+dirty" if dirty.strip() else "")


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore", module="webdataset")
    import trainer.objectives as registry

    parser = argparse.ArgumentParser(prog="bench_learning", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--only", help="comma-separated objectives (default: every registered one in SETTINGS)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=str(HERE.parent.parent.parent / "shared" / "data" / "cifar10"))
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "manyview-bench-learning"))
    parser.add_argument("--output")
    parser.add_argument("--reuse", action="store_true",
                        help="keep rows already measured in --workdir with the same arguments, steps and code (the "
                             "last commit of trainer/ and tests/learning_helpers.py); with uncommitted changes there "
                             "nothing is reused")
    parser.add_argument("--linear", action="store_true",
                        help="also a linear probe (trainer.evaluate --linear) of the floor and the trained model: what "
                             "the reconstruction objectives (mae, simmim, aim) are judged by")
    args = parser.parse_args(argv)
    registered = set(registry.list_objectives())
    names = [n.strip() for n in args.only.split(",")] if args.only else [n for n in SETTINGS if n in registered]
    unknown = [n for n in names if n not in SETTINGS or n not in registered]
    if unknown:
        parser.error(f"no settings or no registered objective for {unknown}")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    shards = prepare_shards(workdir, args.data)
    command = "python tests/benchmarks/bench_learning.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    code = source_version()
    trainer_commit = code_key()
    if args.reuse and trainer_commit is None:
        print(f"--reuse: {' and '.join(CODE_PATHS)} have uncommitted changes (or this is no git checkout); "
              "every row is measured again", flush=True)
    rows, started = [], time.perf_counter()
    for name in names:
        family, extra = SETTINGS[name]
        objective_args = ["--objective", name, *extra, "--seed", str(args.seed)]
        run = workdir / name
        saved = run / "row.json"
        key = reuse_key(objective_args + (["--linear"] if args.linear else []), args.steps, trainer_commit)
        if args.reuse and saved.exists():  # a row measured earlier with the same arguments, steps and code
            row = json.loads(saved.read_text())
            if reusable(row, key):
                row["reused"] = True
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.perf_counter()
        floor = scores_after(shards, run / "floor", 0, objective_args, linear=args.linear)
        trained = scores_after(shards, run / "trained", args.steps, objective_args, linear=args.linear)
        metrics = [json.loads(line) for line in (run / "trained" / "metrics.jsonl").read_text().splitlines()]
        row = {"objective": name, "family": family, "floor": floor["knn_top1"], "knn_top1": trained["knn_top1"],
               "gain": trained["knn_top1"] - floor["knn_top1"],
               "collapsed": any(m.get("collapsed") for m in metrics), "seconds": time.perf_counter() - t0,
               "args": objective_args, "steps": args.steps, "code": code, "reuse_key": key}
        if args.linear:
            row.update(linear_floor=floor["linear_top1"], linear_top1=trained["linear_top1"])
        saved.write_text(json.dumps(row))
        rows.append(row)
        print(json.dumps(row), flush=True)
    from bench_vs_lightly import machine_description

    machine = machine_description()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## {now}: {args.steps} steps, batch 64, cnn-small, seed {args.seed}", "",
             f"- Machine: {machine['cores']} cores, {machine['cpu']}, {machine['gpu']}; torch {machine['torch']}",
             f"- Command: `{command}` ({(time.perf_counter() - started) / 60:.0f} min in all)",
             f"- Code: {', '.join(sorted({r['code'][:7] + ('+dirty' if r['code'].endswith('+dirty') else '') for r in rows}))}"
             + (f" ({sum(bool(r.get('reused')) for r in rows)} rows reused from an earlier run)" if any(r.get('reused') for r in rows) else ""),
             "",
             "| objective | family | floor | kNN top-1 | gain (points) | beats floor + 2 | collapsed | train+eval s |"
             + (" linear floor | linear top-1 | linear gain |" if args.linear else ""),
             "|---|---|---:|---:|---:|---|---|---:|" + ("---:|---:|---:|" if args.linear else "")]
    for r in sorted(rows, key=lambda r: -r["knn_top1"]):
        line = (f"| `{r['objective']}` | {r['family']} | {100 * r['floor']:.1f} | {100 * r['knn_top1']:.1f} | "
                f"{100 * r['gain']:+.1f} | {'yes' if r['gain'] >= 0.02 else 'no'} | "
                f"{'yes' if r['collapsed'] else 'no'} | {r['seconds']:.0f} |")
        if args.linear:
            line += (f" {100 * r['linear_floor']:.1f} | {100 * r['linear_top1']:.1f} | "
                     f"{100 * (r['linear_top1'] - r['linear_floor']):+.1f} |")
        lines.append(line)
    lines.append("")
    markdown = "\n".join(lines)
    print("\n" + markdown)
    if args.output:
        fresh = not os.path.exists(args.output)
        with open(args.output, "a", encoding="utf-8") as handle:
            if fresh:
                handle.write("# kNN after the same short budget, every objective\n\nWritten by "
                             "`tests/benchmarks/bench_learning.py` (one dated section per run). Per-objective options "
                             "are in its `SETTINGS`.\n\n")
            handle.write(markdown + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
