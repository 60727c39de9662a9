"""trainer.host_memory: glibc keeps freed blocks for reuse, so a repeated large allocation stops faulting."""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys

import pytest

from trainer.config import add_arguments, config_from_args

# Allocates and frees a 64 MiB tensor (above glibc's largest mmap threshold) 10 times after 30 warm-up rounds
# (with kept memory the heap first grows to a steady size: PyTorch's aligned allocations do not fit exactly
# into the block freed just before) and prints the minor page faults of those 10 rounds.
_FAULTS = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from trainer.host_memory import keep_freed_memory
    assert keep_freed_memory()
for _ in range(30):
    torch.ones(16 * 1024 * 1024)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(16 * 1024 * 1024)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    default, kept = _faults("default"), _faults("keep")
    # Default glibc maps and unmaps the 64 MiB block every round: ~16k faults (4 KiB pages) per round.
    assert default > 10 * 8000, default
    assert kept < 1000, kept


def test_flag_defaults_on_and_turns_off():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    common = ["--objective", "simclr", "--train-data", "x.tar", "--max-steps", "1"]
    assert config_from_args(parser.parse_args(common)).keep_freed_memory is True
    assert config_from_args(parser.parse_args([*common, "--no-keep-freed-memory"])).keep_freed_memory is False
