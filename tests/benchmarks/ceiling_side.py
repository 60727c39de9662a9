"""The training-speed ceiling: manyview's model step (forward, backward, optimizer step, the objective's hooks)
on one batch of views made before the clock starts, so no data loading or augmentation is paid.

Writes ``metrics.jsonl`` rows in the loop's format (step, images_seen, time, peak memory), so the benchmark
measures it exactly as it measures the real runs.

    python tests/benchmarks/ceiling_side.py --objective simclr --backbone resnet18-cifar --image-size 32 \\
        --batch-size 256 --train-data 'SHARDS/train-000000.tar.gz' --output DIR --time-budget 60 --max-steps 100
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def first_batch(views, urls: list[str], batch_size: int) -> dict:
    """``batch_size`` real images through the objective's view recipe, collated as the loop would get them."""
    from trainer.data.pipeline import collate
    from trainer.data.shards import decode_image, sample_from_members
    import webdataset as wds

    samples = []
    for raw in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
        members = {k: v for k, v in raw.items() if not k.startswith("__")}
        sample = sample_from_members(raw["__key__"], raw["__url__"], members)
        out = views(decode_image(sample.image, "RGB"), sample)
        out.update(label=sample.label, id=sample.sample_id, skipped=0)
        samples.append(out)
        if len(samples) == batch_size:
            break
    batch = collate(samples)
    batch.pop("skipped")
    return batch


def main(argv: list[str] | None = None) -> int:
    import torch

    from trainer.config import TrainConfig, load_recipe, recipe_path
    from trainer.host_memory import keep_freed_memory
    from trainer.data.shards import expand_patterns
    from trainer.objectives import ObjectiveSpec, get_objective
    from trainer.optim import build_optimizer, lr_at, scaled_lr
    from trainer.loop import peak_memory_mb

    parser = argparse.ArgumentParser(prog="ceiling_side", description=__doc__.splitlines()[0])
    parser.add_argument("--objective", required=True)
    parser.add_argument("--backbone", default="resnet18-cifar")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--train-data", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--time-budget", type=float, default=60)
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    args = parser.parse_args(argv)

    config = load_recipe(recipe_path(args.objective), TrainConfig(objective=args.objective))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        keep_freed_memory()  # as trainer.loop.train does on the CPU
    torch.manual_seed(0)
    objective = get_objective(args.objective).build(ObjectiveSpec(
        backbone=args.backbone, image_size=args.image_size, options=dict(config.objective_options),
        num_train_samples=50000, total_steps=args.max_steps, global_batch_size=args.batch_size)).to(device)
    base_lr = scaled_lr(config.optim, args.batch_size)
    optimizer = build_optimizer(objective.parameter_groups(config.optim.weight_decay), config.optim, base_lr)
    batch = first_batch(objective.views(), expand_patterns(args.train_data), args.batch_size)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    os.makedirs(args.output, exist_ok=True)
    started, images = time.perf_counter(), 0
    objective.train()
    with open(os.path.join(args.output, "metrics.jsonl"), "w", encoding="utf-8") as metrics:
        for step in range(args.max_steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, base_lr, config.optim.warmup_steps, args.max_steps, config.optim.min_lr_ratio)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = objective(batch)["loss"]
            loss.backward()
            objective.before_optimizer_step(step, args.max_steps)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            objective.after_step(step, args.max_steps)
            if device.type == "cuda":
                torch.cuda.synchronize()
            images += args.batch_size
            metrics.write(json.dumps({"step": step + 1, "loss": float(loss.detach()), "images_seen": images, "time": time.time(),
                                      "peak_memory_mb": peak_memory_mb(device)}) + "\n")
            metrics.flush()
            if time.perf_counter() - started >= args.time_budget:
                break
    return 0


if __name__ == "__main__":
    sys.exit(main())
