"""Shards written by the ``img2dataset`` package itself, as a new user gets them: downloaded from a local
``http.server`` on 127.0.0.1 serving generated PNG/JPEG files, one run with ``--caption_col`` and one without.

Covered: an image-text objective refuses shards without captions with a clear error (and the data workers skip
and count samples without text, stopping above ``data.max_missing_text``); a caption only in ``json["caption"]``
is read; two img2dataset runs (both numbering keys from 0) get distinct ids and index together, while a real
duplicate names both shards and the fix; a memory-bank objective (instdisc) trains on them with dense slots and
``--resume`` finds the same slots, refusing shards the checkpoint's numbering lacks.
"""
from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from server_helpers import free_port, stop_process, wait_until_listening
from trainer.data.shards import expand_patterns, iter_samples, key_to_id

pytestmark = pytest.mark.skipif(importlib.util.find_spec("img2dataset") is None, reason="img2dataset is not "
                                "installed (pip install --no-deps img2dataset, plus its deps)")

IMAGES = 24
PER_SHARD = 10  # 3 shards per run: 10, 10, 4 samples
# img2dataset runs in a child process of its own. It starts its download and logger processes with "spawn", and
# each would import it again (torch, cv2: 7 to 15 s on 2 cores), so this child has them forked instead: the same
# code writes the shards, only the way its processes start differs. Both downloads share the one import.
DOWNLOAD = """
import multiprocessing
import sys
from multiprocessing.context import ForkProcess

import img2dataset.distributor
from img2dataset import download
from img2dataset.logger import LoggerProcess


class ForkedLogger(LoggerProcess):
    _start_method = "fork"
    _Popen = staticmethod(ForkProcess._Popen)


img2dataset.distributor.get_context = lambda method: multiprocessing.get_context("fork")
sys.modules["img2dataset.main"].LoggerProcess = ForkedLogger

if __name__ == "__main__":
    url_list = sys.argv[1]
    for output, caption in zip(sys.argv[2::2], sys.argv[3::2]):
        download(url_list=url_list, input_format="parquet", url_col="url", caption_col=caption or None,
                 output_folder=output, output_format="webdataset", image_size=32, resize_mode="border",
                 processes_count=1, thread_count=4, number_sample_per_shard=%d, timeout=10, retries=1,
                 enable_wandb=False, compute_hash=None)
""" % PER_SHARD


def _serve_images(directory: Path) -> list[tuple[str, str]]:
    """Write IMAGES small images (PNG and JPEG alternately); (file name, caption) of each."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    files = []
    for i in range(IMAGES):
        pixels = np.clip(rng.integers(0, 256, 3) + rng.integers(-50, 50, (40, 48, 3)), 0, 255).astype(np.uint8)
        name = f"{i:03d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(pixels).save(directory / name)
        files.append((name, f"a generated picture number {i}"))
    return files


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two img2dataset outputs of the same image list: ``captioned`` (--caption_col caption) and
    ``uncaptioned`` (no caption column), downloaded at once from a local http.server."""
    import pandas as pd

    root = tmp_path_factory.mktemp("img2dataset")
    www = root / "www"
    www.mkdir()
    files = _serve_images(www)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port),
                               "--directory", str(www)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_listening(port, server, "http.server", timeout_s=20)
        url_list = root / "list.parquet"
        pd.DataFrame({"url": [f"http://127.0.0.1:{port}/{name}" for name, _ in files],
                      "caption": [caption for _, caption in files]}).to_parquet(url_list)
        script = root / "download.py"
        script.write_text(DOWNLOAD)
        env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}  # no update check over the network
        outputs = {"captioned": "caption", "uncaptioned": ""}
        arguments = [str(value) for name, caption in outputs.items() for value in (root / name, caption)]
        child = subprocess.run([sys.executable, str(script), str(url_list), *arguments], cwd=root, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
        assert child.returncode == 0, f"img2dataset failed:\n{child.stdout.decode(errors='replace')[-3000:]}"
    finally:
        stop_process(server)
    found = {name: root / name for name in outputs}
    for directory in found.values():
        assert len(expand_patterns(str(directory))) == 3, sorted(p.name for p in directory.iterdir())
    return found


def _members(shard: Path) -> list[str]:
    with tarfile.open(shard) as tar:
        return tar.getnames()


def _train_args(data: str, run: Path, objective: str, *extra: str) -> list[str]:
    return ["--objective", objective, "--train-data", data, "--output", str(run), "--backbone", "cnn-small",
            "--image-size", "32", "--batch-size", "8", "--num-workers", "0", "--log-every", "1", *extra]


# ---------------------------------------------------------------- captions


def test_the_shards_are_img2datasets_own(runs):
    names = _members(runs["captioned"] / "00000.tar")
    assert any(n.endswith(".txt") for n in names) and any(n.endswith(".json") for n in names)
    assert not any(n.endswith(".txt") for n in _members(runs["uncaptioned"] / "00000.tar"))
    keys = {s.key for s in iter_samples(str(runs["uncaptioned"]))}
    assert len(keys) == IMAGES and min(keys) == "0" * len(min(keys))  # keys numbered from 0, zero padded


def test_clip_refuses_shards_without_captions_with_a_clear_error(runs, tmp_path, caplog):
    from trainer.pretrain import main

    with caplog.at_level(logging.ERROR):
        status = main(_train_args(str(runs["uncaptioned"]), tmp_path / "clip", "clip", "--max-steps", "1"))
    assert status != 0
    assert re_search(r"\d+ of the first \d+ samples in .*00000\.tar have no caption \(no `txt` member and no "
                     r"json\[\"caption\"\]\)", caplog.text)
    assert "--caption_col" in caplog.text and "data.max_missing_text" in caplog.text
    assert not (tmp_path / "clip" / "model").exists()


def re_search(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, text) is not None


def _raw_samples(directory: Path, drop_text_every: int = 0) -> list[dict]:
    """The raw WebDataset samples of ``directory``'s shards, as the pipeline's tar reader gives them; with
    ``drop_text_every`` = k, every k-th sample loses its ``txt`` member and its json caption."""
    raw: list[dict] = []
    for shard in expand_patterns(str(directory)):
        with tarfile.open(shard) as tar:
            for info in tar:
                key, _, ext = os.path.basename(info.name).partition(".")
                if not raw or raw[-1]["__key__"] != key:
                    raw.append({"__key__": key, "__url__": shard})
                raw[-1][ext] = tar.extractfile(info).read()
    for i, sample in enumerate(raw):
        if drop_text_every and i % drop_text_every == 0:
            sample.pop("txt", None)
            meta = json.loads(sample["json"])
            meta.pop("caption", None)
            sample["json"] = json.dumps(meta).encode()
    return raw


def test_samples_without_text_are_skipped_counted_and_stop_the_run_above_the_threshold(runs):
    from trainer.data.pipeline import BuildViews, MissingTextError

    def views(image, sample):
        return {"caption": sample.caption}

    raw = _raw_samples(runs["captioned"], drop_text_every=6)  # 4 of 24 without text
    kept = list(BuildViews(views, max_missing_text=0.25, min_samples=10)(raw))
    assert len(kept) == IMAGES - 4 and all(out["caption"] for out in kept)
    assert sum(out["missing_text"] for out in kept) == 4  # each skipped sample counted once
    with pytest.raises(MissingTextError, match=r"4 of the \d+ samples .* have no text .* data.max_missing_text=0.1"):
        list(BuildViews(views, max_missing_text=0.1, min_samples=20)(raw))
    # Objectives that need no text see every sample, without a missing_text count.
    plain = list(BuildViews(views)(raw))
    assert len(plain) == IMAGES and "missing_text" not in plain[0]


def test_a_caption_only_in_json_is_read(runs, tmp_path):
    from trainer.loop import refuse_shards_without_text

    json_only = tmp_path / "json_only"
    json_only.mkdir()
    for shard in expand_patterns(str(runs["captioned"])):
        with tarfile.open(shard) as source, tarfile.open(json_only / os.path.basename(shard), "w") as target:
            for info in source:
                if not info.name.endswith(".txt"):
                    target.addfile(info, io.BytesIO(source.extractfile(info).read()))
    assert not any(n.endswith(".txt") for n in _members(json_only / "00000.tar"))
    captions = {s.key: s.caption for s in iter_samples(str(json_only))}
    expected = {s.key: s.caption for s in iter_samples(str(runs["captioned"]))}  # from txt
    assert captions == expected and all(c.startswith("a generated picture number") for c in captions.values())
    refuse_shards_without_text(expand_patterns(str(json_only)), 0.01)  # no error: the json captions count
    with pytest.raises(ValueError, match="have no caption"):
        refuse_shards_without_text(expand_patterns(str(runs["uncaptioned"])), 0.01)


# ---------------------------------------------------------------- ids


def test_two_img2dataset_runs_get_distinct_ids_and_index_together(runs, tmp_path_factory):
    from index.build import build_index
    from onnx_fixtures import shared_onnx_dir

    first, second = (list(iter_samples(str(runs[name]))) for name in ("captioned", "uncaptioned"))
    assert {s.key for s in first} == {s.key for s in second}  # the same keys: a hash of the key alone collides
    assert {key_to_id(s.key, "") for s in first} == {key_to_id(s.key, "") for s in second}
    ids = [s.sample_id for s in first + second]
    assert len(set(ids)) == 2 * IMAGES
    onnx_dir = shared_onnx_dir(tmp_path_factory, with_text=True)
    output = tmp_path_factory.mktemp("both-index")
    info = build_index(onnx_dir, f"{runs['captioned']}::{runs['uncaptioned']}", output, batch_size=16,
                       progress=False)
    assert info["count"] == 2 * IMAGES


def test_a_real_duplicate_names_both_shards_and_the_fix(runs, tmp_path, tmp_path_factory):
    from index.build import build_index
    from onnx_fixtures import shared_onnx_dir

    copy = tmp_path / "elsewhere" / "captioned"  # another dataset in a directory of the same name
    shutil.copytree(runs["captioned"], copy)
    onnx_dir = shared_onnx_dir(tmp_path_factory, with_text=True)
    with pytest.raises(ValueError) as error:
        build_index(onnx_dir, f"{runs['captioned']}::{copy}", tmp_path / "index", batch_size=16, progress=False)
    message = str(error.value)
    assert re_search(r"duplicate sample id \d+: key '\d+' in .*captioned/0000\d\.tar and key '\d+' in "
                     r".*elsewhere/captioned/0000\d\.tar", message)
    assert "same name" in message and "python -m trainer.prepare" in message


# ---------------------------------------------------------------- memory-bank objectives


def test_memory_bank_objectives_get_dense_slots_from_any_shards(runs):
    from trainer.data.pipeline import train_batches
    from trainer.data.slots import DenseSlots
    from trainer.data.views import AugmentConfig
    from trainer.objectives.instdisc import OneView

    urls = expand_patterns(str(runs["uncaptioned"]))
    slots = DenseSlots.from_urls(list(reversed(urls)))
    assert len(slots) == IMAGES and [u for u, _ in slots.shards] == sorted(os.path.abspath(u) for u in urls)
    views = OneView(32, [0.5] * 3, [0.5] * 3, AugmentConfig())
    seen = []
    for step, batch in enumerate(train_batches(urls, views, 8, num_workers=0, seed=0, shuffle_buffer=16,
                                               slots=slots)):
        seen.extend(batch["id"].tolist())
        if step == 5:
            break
    assert min(seen) >= 0 and max(seen) < IMAGES and len(set(seen)) > IMAGES // 2


def test_instdisc_trains_on_img2dataset_shards_and_resumes_with_the_same_slots(runs, tmp_path, caplog):
    from trainer.checkpoint import checkpoint_slots
    from trainer.pretrain import main

    run = tmp_path / "instdisc"
    options = ["--set", "projection_dim=16", "--checkpoint-every", "3"]
    data = str(runs["uncaptioned"])
    assert main(_train_args(data, run, "instdisc", "--max-steps", "3", *options)) == 0
    first = checkpoint_slots(str(run / "checkpoints" / "step_00000003"))
    assert first is not None and len(first) == IMAGES
    # Resumed with the shards listed in another order: the checkpoint's numbering is kept.
    shards = expand_patterns(data)
    listed = "::".join(reversed(shards))
    assert main(_train_args(listed, run, "instdisc", "--max-steps", "5", "--resume", *options)) == 0
    second = checkpoint_slots(str(run / "checkpoints" / "step_00000005"))
    assert second is not None and second.shards == first.shards
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    # Resumed on more shards than the numbering holds: refused, naming the shard.
    more = f"{data}::{runs['captioned']}"
    with caplog.at_level(logging.ERROR):
        assert main(_train_args(more, run, "instdisc", "--max-steps", "7", "--resume", *options)) != 0
    assert re_search(r"--resume: .*captioned/0000\d\.tar holds a shard not in the checkpoint's memory-bank slot "
                     r"mapping \(24 samples over 3 shards\)", caplog.text)
