"""Resumable checkpoints in ``RUN/checkpoints/step_XXXXXXXX``, written so a crash never corrupts one.

Every process writes into ``step_N.tmp`` through ``Accelerator.save_state``; only after all are done does
the main process mark it complete and rename it into place. A directory without the marker is never
resumed from, so a run killed mid-write resumes from the previous good checkpoint. Runs of memory-bank objectives
also keep their sample -> slot numbering there (``trainer.data.slots``), so ``--resume`` indexes the same rows.
"""
from __future__ import annotations

import os
import re
import shutil

from trainer.data.slots import DenseSlots

COMPLETE_MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class TrainState:
    """Loop counters saved with every checkpoint (registered with ``accelerator.register_for_checkpointing``)."""

    def __init__(self) -> None:
        self.step = 0
        self.images_seen = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "images_seen": self.images_seen}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.images_seen = int(state.get("images_seen", 0))


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def complete_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = checkpoint_root(run_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if match and os.path.exists(os.path.join(path, COMPLETE_MARKER)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str) -> str | None:
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(accelerator, run_dir: str, step: int, keep: int, slots: DenseSlots | None = None) -> str:
    """Collective: all processes call it. Returns the final checkpoint path. ``slots``: the run's dense sample
    slots (memory-bank objectives), written beside the state before the checkpoint is marked complete."""
    root = checkpoint_root(run_dir)
    final = os.path.join(root, f"step_{step:08d}")
    staging = final + ".tmp"
    if accelerator.is_main_process:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(staging)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if slots is not None:
            slots.save(staging)
        with open(os.path.join(staging, COMPLETE_MARKER), "w", encoding="utf-8") as handle:
            handle.write(f"{step}\n")
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(staging, final)
        for _, old in complete_checkpoints(run_dir)[:-max(1, keep)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def checkpoint_slots(checkpoint: str) -> DenseSlots | None:
    """The dense sample slots saved in ``checkpoint``, or None when it holds none (objectives without a memory
    bank, or a checkpoint written before runs kept them)."""
    return DenseSlots.load(checkpoint)
