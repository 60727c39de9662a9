"""Starting and stopping a server process in a test: a free port, waiting until it answers, stopping it by pid."""
from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_serving(url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Poll ``url`` until it answers 200; fail with the server log when the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the app exited with status {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.25)
    pytest.fail(f"the app did not answer on {url} within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def wait_until_listening(port: int, process: subprocess.Popen, what: str, timeout_s: float = 30.0) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:``port``; ``RuntimeError`` naming ``what`` when
    ``process`` exits first or time runs out (for servers that answer no HTTP 200 at a fixed path)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"{what} exited with status {process.returncode} before listening on {port}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout_s:.0f} s")
            time.sleep(0.05)


def process_tree(markers: tuple[str, ...]) -> set[int]:
    """Processes whose command line names one of ``markers``, with all their descendants (what a Ray cluster
    started with ``ray start`` consists of: its workers and agents rename themselves ``ray::...``); never this
    process."""
    parents: dict[int, int] = {}
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if any(marker in command for marker in markers):
            found.add(int(entry.name))
    while children := {pid for pid, parent in parents.items() if parent in found} - found:
        found |= children
    return found - {os.getpid()}


def stop_process(process: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """Terminate ``process`` (by its pid), killing it when it does not exit within ``timeout_s``."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_s)
