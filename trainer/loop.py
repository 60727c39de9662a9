"""The one training loop, ``train(config)``: the command lines ``trainer/pretrain.py`` and ``python -m
trainer.evolve`` call it.

The loop knows nothing of any objective: it builds one from the registry, feeds it batches of the views
it asked for, and steps the optimizer on the ``loss`` it returns.
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from trainer.checkpoint import TrainState, checkpoint_slots, latest_checkpoint, save_checkpoint
from trainer.config import TrainConfig
from trainer.data import storage
from trainer.data.batched_augment import device_views_from
from trainer.data.pipeline import NO_TEXT_HINT, train_batches
from trainer.data.shards import count_samples, expand_patterns, iter_shard, sample_text
from trainer.data.slots import DenseSlots
from trainer.data.views import TwoViews
from trainer.distributed import synchronise_batch_norm
from trainer.grad_cache import average_gradients, grad_cache_backward, supports_grad_cache
from trainer.host_memory import keep_freed_memory
from trainer.models import save_model
from trainer.objectives import ObjectiveSpec, get_objective
from trainer.objectives.diagnostics import COLLAPSE_THRESHOLD, is_collapsed
from trainer.optim import build_optimizer, lr_at, scaled_lr

log = logging.getLogger("manyview.pretrain")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


REMOTE_PREFIXES = ("pipe:",)  # shards that cannot be counted up front (fsspec URLs can: see count_samples)


@dataclass
class StepContext:
    """What the step loop works with, built once by ``train``."""

    accelerator: Accelerator
    objective: torch.nn.Module  # as prepared by Accelerate (DistributedDataParallel under several processes)
    task: Any  # the same Objective unwrapped: its hooks and embed()/loss_from_embeddings()
    optimizer: torch.optim.Optimizer
    state: TrainState  # step and images seen, saved with every checkpoint
    config: TrainConfig
    views: Any  # the objective's view recipe; one with ``on_device`` augments batches on the training device
    urls: list[str]
    total_steps: int
    base_lr: float
    metrics_path: str
    slots: DenseSlots | None = None  # memory-bank objectives: the training samples' dense slots (batch["id"])
    # Image-text objectives: samples without text are skipped and counted, up to this fraction (BuildViews).
    max_missing_text: float | None = None

    @property
    def micro_batch_size(self) -> int | None:
        return micro_batch_size(self.config)

    @property
    def global_batch(self) -> int:
        return self.config.batch_size * self.accelerator.num_processes


def micro_batch_size(config: TrainConfig) -> int | None:
    """The gradient-cache micro-batch size when it splits the batch (``--micro-batch-size``), else None."""
    size = config.micro_batch_size
    return size if size and size < config.batch_size else None


def samples_per_epoch(config: TrainConfig, urls: list[str]) -> int | None:
    """The epoch length: ``data.samples_per_epoch`` when given, else counted from the shards, local or fsspec URLs
    (manifest or tar headers, read once); None for ``pipe:`` shards (then the run needs --max-steps)."""
    if config.data.samples_per_epoch:
        return int(config.data.samples_per_epoch)
    if any(url.startswith(REMOTE_PREFIXES) for url in urls):
        return None
    return count_samples(urls)


TEXT_PROBE_SAMPLES = 64  # samples of the first shard read at the start to refuse shards without any text


def refuse_shards_without_text(urls: list[str], max_missing_text: float) -> None:
    """Image-text objectives: refuse at the start when none of the first shard's first samples has text (an
    img2dataset run without --caption_col), instead of training on nothing but skipped samples."""
    if not 0 <= max_missing_text < 1:
        raise ValueError(f"data.max_missing_text must be a fraction in [0, 1), got {max_missing_text}")
    read = missing = 0
    for sample in iter_shard(urls[0]):
        read += 1
        missing += not sample_text(sample)
        if read >= TEXT_PROBE_SAMPLES:
            break
    if read and missing == read:
        raise ValueError(f"{missing} of the first {read} samples in {urls[0]} have no caption (no `txt` member and no "
                         f"json[\"caption\"]); this objective trains on image-text pairs. {NO_TEXT_HINT}")
    if missing:
        log.warning("%d of the first %d samples in %s have no caption; samples without one are skipped, and the run "
                    "stops once more than data.max_missing_text=%s of them have none", missing, read, urls[0],
                    max_missing_text)


def dense_slots(config: TrainConfig, urls: list[str]) -> DenseSlots:
    """The training samples' dense slots 0..n-1 (memory-bank objectives): numbered from the shards' tar headers,
    or, on --resume, the numbering the checkpoint kept (refused when the shards now hold samples it lacks)."""
    current = DenseSlots.from_urls(urls)
    checkpoint = latest_checkpoint(config.output) if config.resume else None
    saved = checkpoint_slots(checkpoint) if checkpoint else None
    if saved is None:
        if checkpoint:
            log.warning("--resume: %s keeps no sample slot numbering (an older run); numbering the shards afresh",
                        checkpoint)
        return current
    saved.check_covers(current)
    return saved


def total_steps_for(config: TrainConfig, samples: int | None, world_size: int) -> int:
    if config.max_steps is not None:
        return int(config.max_steps)
    if not samples:
        raise ValueError("--epochs needs the epoch length, which remote (pipe:/URL) shards cannot give: "
                         "set --samples-per-epoch, or train for --max-steps")
    return max(1, math.ceil(config.epochs * samples / (config.batch_size * world_size)))


def model_card(config: TrainConfig, encoder, step: int) -> dict:
    model = encoder.config
    return {
        "objective": config.objective,
        "backbone": model.backbone,
        "embed_dim": encoder.embed_dim,
        "image_size": model.image_size,
        "channels": model.channels,
        "mean": model.mean,
        "std": model.std,
        "text_model": model.text.to_dict() if model.text else None,
        "steps": step,
        "train_data": config.data.train_data,
        "init_from": config.init_from,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_model(accelerator, objective, config: TrainConfig, step: int) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        task = accelerator.unwrap_model(objective)
        card = {**model_card(config, task.encoder, step), **task.model_card_extras()}
        save_model(task.encoder, os.path.join(config.output, "model"), card)
        log.info("wrote %s", os.path.join(config.output, "model"))
    accelerator.wait_for_everyone()


def append_metrics(path: str, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def trim_metrics(path: str, step: int) -> None:
    """Keep only the rows of ``path`` up to ``step`` (all of them gone for a fresh run), atomically."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as handle:
        kept = [line for line in handle if line.strip() and json.loads(line).get("step", 0) <= step]

    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.writelines(kept)

    storage.replace_local(path, write)


def train(config: TrainConfig) -> dict:
    """Run (or resume) training as configured; returns the final step's metrics."""
    urls = expand_patterns(config.data.train_data)
    objective_cls = get_objective(config.objective)
    # cpu=True where no GPU exists: Accelerate then runs several processes over gloo (MULTI_CPU) instead of
    # silently treating each launched process as a lone one.
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())
    if config.keep_freed_memory and accelerator.device.type == "cpu":
        keep_freed_memory()  # process-wide, so it stays for the rest of this process
    set_seed(config.seed)  # identical initial weights on every process
    needs_text = objective_cls.needs_text(dict(config.objective_options))
    if needs_text:
        refuse_shards_without_text(urls, config.data.max_missing_text)
    slots = dense_slots(config, urls) if objective_cls.needs_dense_ids(dict(config.objective_options)) else None
    if slots is not None and not config.data.samples_per_epoch:
        num_samples = len(slots)  # counted while numbering: one pass over the tar headers
    else:
        num_samples = samples_per_epoch(config, urls)
    total_steps = total_steps_for(config, num_samples, accelerator.num_processes)
    global_batch = config.batch_size * accelerator.num_processes
    objective = objective_cls.build(ObjectiveSpec(
        backbone=config.backbone, image_size=config.data.image_size,
        mean=config.data.mean, std=config.data.std, options=dict(config.objective_options),
        num_train_samples=num_samples if slots is None else len(slots),  # the bank holds every slot
        total_steps=total_steps, global_batch_size=global_batch,
        register_tokens=config.register_tokens, vit_pool=config.vit_pool,
        init_from=config.init_from, init_strict=config.init_strict,
    ))
    if accelerator.num_processes > 1:
        # The papers' global batch includes global batch-norm statistics.
        objective = synchronise_batch_norm(objective, accelerator.device)
    if micro_batch_size(config) and not supports_grad_cache(objective):
        raise ValueError(f"objective {config.objective!r} cannot train in micro-batches (--micro-batch-size): it does "
                         f"not split into embed()/loss_from_embeddings(); use a smaller --batch-size instead")
    if config.channels_last:
        objective = objective.to(memory_format=torch.channels_last)
    if config.compile:
        objective.encoder.compile()  # in place: parameter names (checkpoints, the saved model) stay the same
    base_lr = scaled_lr(config.optim, global_batch)
    optimizer = build_optimizer(objective.parameter_groups(config.optim.weight_decay), config.optim, base_lr)
    views = device_augmentation(objective.views(), config.data.augment_on_device, accelerator.device)
    objective, optimizer = accelerator.prepare(objective, optimizer)
    state = TrainState()
    accelerator.register_for_checkpointing(state)

    os.makedirs(config.output, exist_ok=True)
    metrics_path = os.path.join(config.output, "metrics.jsonl")
    if config.resume:
        checkpoint = latest_checkpoint(config.output)
        if checkpoint is None:
            log.warning("--resume: no complete checkpoint in %s; starting from step 0", config.output)
        else:
            accelerator.load_state(checkpoint)
            log.info("resumed from %s at step %d", checkpoint, state.step)
    if accelerator.is_main_process:
        trim_metrics(metrics_path, state.step)  # rows a killed run logged after its last checkpoint
        with open(os.path.join(config.output, "train_config.json"), "w", encoding="utf-8") as handle:
            json.dump({**config.to_dict(), "world_size": accelerator.num_processes, "total_steps": total_steps}, handle, indent=2)
        log.info("objective=%s backbone=%s processes=%d global batch=%d steps=%d lr=%.4g shards=%d",
                 config.objective, config.backbone, accelerator.num_processes, global_batch, total_steps, base_lr, len(urls))

    last: dict = {"step": state.step}
    if state.step < total_steps:
        last = run_steps(StepContext(
            accelerator=accelerator, objective=objective, task=accelerator.unwrap_model(objective), optimizer=optimizer,
            state=state, config=config, views=views, urls=urls, total_steps=total_steps, base_lr=base_lr,
            metrics_path=metrics_path, slots=slots,
            max_missing_text=config.data.max_missing_text if needs_text else None,
        ))
    write_model(accelerator, objective, config, state.step)
    accelerator.end_training()
    return last


def device_augmentation(views, mode: str, device: torch.device):
    """``views`` split into decoding in the workers and batched augmentation on ``device`` (``on_device``), when
    ``mode`` asks for it (``auto``: on a GPU) and the recipe is a plain two-view one; else ``views`` unchanged."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return views
    reason = None
    if type(views) is not TwoViews:
        reason = f"this objective's {type(views).__name__} views cannot be made on the device (two-view recipes can)"
    elif any(c is not None and c.background_prob > 0 for c in (views.config, views.second_config)):
        reason = "background augmentation needs the whole decoded image in the workers"
    if reason:
        if mode == "on":
            raise ValueError(f"--augment-on-device on: {reason}; use --augment-on-device off")
        return views
    log.info("augmentation: batched on %s; data workers only decode", device)
    return device_views_from(views)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated on ``device`` when it is a GPU, else this process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource  # Unix only

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stream_seed(seed: int, rank: int, step: int) -> int:
    """The data stream's seed for ``rank`` starting at ``step``: shard draws, sample shuffle and the workers'
    augmentation RNG all follow from it."""
    return seed * 7919 + rank * 104729 + step


def train_step(ctx: StepContext, batch: dict) -> dict:
    """Forward and backward for one optimizer step; gradients are averaged over processes on return.

    Raises NonFiniteLoss when the loss is NaN or infinite, before any optimizer step (and, without micro-batches,
    before the backward pass), so the last checkpoint stays the last good state."""
    micro_batch_size = ctx.micro_batch_size
    with ctx.accelerator.autocast():
        if micro_batch_size:
            outputs = grad_cache_backward(ctx.task, batch, micro_batch_size, ctx.accelerator.backward)
            average_gradients(ctx.task.parameters())  # the cached passes bypass DistributedDataParallel
        else:
            outputs = ctx.objective(batch)
    loss = outputs["loss"]
    if not torch.isfinite(loss.detach()).all():
        raise NonFiniteLoss(
            f"loss is {loss.item()} at step {ctx.state.step}; stopping. The last good checkpoint is kept in "
            f"{os.path.join(ctx.config.output, 'checkpoints')}; lower --lr or enable --grad-clip and --resume."
        )
    if not micro_batch_size:
        ctx.accelerator.backward(loss)
    return outputs


def _to_device(ctx: StepContext, batch: dict, generator: torch.Generator | None) -> dict:
    """``batch`` on the training device, augmented there when the views ask for it, channels-last if configured."""
    device = ctx.accelerator.device
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    if generator is not None:
        batch = ctx.views.on_device(batch, generator)
    if ctx.config.channels_last:
        batch = {k: v.contiguous(memory_format=torch.channels_last) if torch.is_tensor(v) and v.ndim == 4 else v
                 for k, v in batch.items()}
    return batch


def _metrics_row(ctx: StepContext, outputs: dict, lr: float, images_per_s: float, skipped: int, grad_norm) -> dict:
    """The metrics.jsonl row for this step: the objective's scalar outputs averaged over processes, and more."""
    accelerator, state = ctx.accelerator, ctx.state
    reduced = {k: accelerator.reduce(v.detach().float(), reduction="mean").item()
               for k, v in outputs.items() if torch.is_tensor(v) and v.numel() == 1}
    row = {"step": state.step, **reduced, "lr": lr, "images_per_s": images_per_s, "images_seen": state.images_seen,
           "corrupt_skipped": skipped, "time": time.time(), "peak_memory_mb": peak_memory_mb(accelerator.device)}
    if grad_norm is not None:
        row["grad_norm"] = float(grad_norm)
    if "embedding_std" in row:
        row["collapsed"] = is_collapsed(row["embedding_std"])
        if row["collapsed"] and accelerator.is_main_process:
            log.warning("step %d: embeddings have collapsed (embedding_std %.4f < %.2f: every image maps "
                        "to nearly the same point); lower the lr or check the objective's settings",
                        state.step, row["embedding_std"], COLLAPSE_THRESHOLD)
    return row


def run_steps(ctx: StepContext) -> dict:
    """Train from ``ctx.state.step`` to ``ctx.total_steps`` (or the time budget), checkpointing as configured;
    returns the last logged metrics row."""
    accelerator, objective, task, optimizer, state, config = (
        ctx.accelerator, ctx.objective, ctx.task, ctx.optimizer, ctx.state, ctx.config)
    progress = tqdm(total=ctx.total_steps, initial=state.step, disable=not accelerator.is_main_process,
                    desc=config.objective, dynamic_ncols=True)
    objective.train()
    skipped_total = missing_text_total = 0
    started = time.perf_counter()
    window_start, window_images = started, 0
    last: dict = {}
    finished = False
    on_device = getattr(ctx.views, "on_device", None) is not None  # batched augmentation on the training device
    while not finished:
        # A fresh data stream at the start and after every checkpoint, seeded by the step: a run resumed from a
        # checkpoint sees exactly the batches the uninterrupted run saw from there.
        seed = stream_seed(config.seed, accelerator.process_index, state.step)
        batches = train_batches(ctx.urls, ctx.views, config.batch_size, config.data.num_workers, seed,
                                config.data.shuffle_buffer, max_missing_text=ctx.max_missing_text,
                                slots=ctx.slots)
        generator = None
        if on_device:
            generator = torch.Generator(device=accelerator.device)
            generator.manual_seed(seed)
        for batch in batches:
            lr = lr_at(state.step, ctx.base_lr, config.optim.warmup_steps, ctx.total_steps, config.optim.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            skipped_total += int(batch.pop("skipped", 0))
            if "missing_text" in batch:
                missing_text_total += int(batch.pop("missing_text").sum())
            outputs = train_step(ctx, _to_device(ctx, batch, generator))
            grad_norm = None
            if config.optim.grad_clip and config.optim.grad_clip > 0:
                grad_norm = accelerator.clip_grad_norm_(objective.parameters(), config.optim.grad_clip)
            task.before_optimizer_step(state.step, ctx.total_steps)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            task.after_step(state.step, ctx.total_steps)
            state.step += 1
            state.images_seen += ctx.global_batch
            window_images += ctx.global_batch
            progress.update(1)

            if state.step % config.log_every == 0 or state.step == ctx.total_steps:
                images_per_s = window_images / max(time.perf_counter() - window_start, 1e-9)
                last = _metrics_row(ctx, outputs, lr, images_per_s, skipped_total, grad_norm)
                if ctx.max_missing_text is not None:
                    last["missing_text_skipped"] = missing_text_total
                window_start, window_images = time.perf_counter(), 0
                if accelerator.is_main_process:
                    append_metrics(ctx.metrics_path, last)
                    progress.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{lr:.3g}", img_s=f"{last['images_per_s']:.0f}")
            if state.step >= ctx.total_steps or (config.time_budget is not None
                                                 and _budget_spent(accelerator, started, config.time_budget)):
                if state.step < ctx.total_steps:
                    log.info("time budget of %.0f s spent at step %d", config.time_budget, state.step)
                finished = True
                break
            if config.checkpoint_every and state.step % config.checkpoint_every == 0:
                save_checkpoint(accelerator, config.output, state.step, config.keep_checkpoints, ctx.slots)
                break  # next segment: a new stream seeded by this step
        del batches  # shuts down this segment's data workers
    progress.close()
    save_checkpoint(accelerator, config.output, state.step, config.keep_checkpoints, ctx.slots)
    if skipped_total:
        log.warning("skipped %d corrupt or image-less samples on this process", skipped_total)
    if missing_text_total:
        log.warning("skipped %d samples without text on this process (data.max_missing_text=%s)", missing_text_total,
                    config.data.max_missing_text)
    return last


def _budget_spent(accelerator, started: float, budget: float) -> bool:
    """Whether any process has trained for ``budget`` seconds; all ranks get the same answer, so none waits."""
    spent = torch.tensor(float(time.perf_counter() - started >= budget), device=accelerator.device)
    return bool(accelerator.reduce(spent, reduction="sum").item() > 0)
