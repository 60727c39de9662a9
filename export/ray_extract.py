"""``python -m export.extract --engine ray``: shards -> embeddings on a Ray cluster (or one machine's cores).

    ray start --head --port 6379                       # then `ray start --address HEAD:6379` on the others
    python -m export.extract --engine ray --address auto --encoder RUN/onnx --data 'SHARDS/*.tar' --output EMB

What runs where:

* **Readers** (Ray tasks, one CPU each, one per shard): read the shard and decode its images with the
  code both engines share (``export.extraction.shard_units`` and ``decode_batch``), yielding unit by unit (a
  streaming generator, so a shard never sits whole in memory). ``--readers`` run at once.
* **Encoders** (an actor pool): each actor holds one ``export.runtime.Encoder`` session, on one GPU
  (``num_gpus=1``) where the cluster has GPUs, else on one CPU. Units go to the least busy actor as they
  arrive (dynamic dispatch, two calls in flight per actor), so decoding and encoding overlap and a slow
  actor does not hold back the others.
* **The driver** (this process) assembles each shard's encoded units in sample order with the local
  engine's ``Assembler``: the same parts (``<shard>-<chunk>``), the same done records, the same
  ``embeddings.json``. Only the driver writes the output; workers need to read the shards and the encoder
  directory (shared storage or URLs), not to write anywhere. A re-run with either engine resumes: finished
  shards are skipped and finished chunks of the others are read past.

Faults: a reader that dies (its worker or node killed) is resubmitted from the shard's first unwritten
chunk (driver-side, up to ``max_attempts`` per shard; the units of its open chunk are dropped and redone).
An encoder actor that dies is restarted by Ray (``max_restarts``) and its in-flight calls are retried
(``max_task_retries``); a call that still fails sends its shard back to the readers the same way. Errors
of the data itself (an unreadable shard) are not retried: the other shards finish, then the error is raised,
as with the local engine.

Why Ray core and not Ray Data (``from_items(...).map_batches(..., concurrency=...)``): the output's unit
of resumption is a chunk of one shard, in sample order, written once with its metadata; Ray Data would
reorder rows across blocks and retry at block granularity, so the driver would have to re-sort and
re-chunk everything it gets back, and its streaming executor costs seconds of start-up and a scheduling
thread per stage on small machines. Here the driver knows exactly which chunk a failure touched and
redoes only that, and a unit crosses the object store once (decoded pixels from the reader to the actor;
only vectors come back; metadata goes to the driver without the pixels). No torch is imported; Ray is
imported only when the engine runs (``require_ray`` says how to install it when it is missing).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time
from typing import Any, Callable, Sequence

import numpy as np

from export.contract import FLOAT_NCHW, Preprocess, read_preprocess
from export.embeddings import done_shards, finalize, part_names
from export.extraction import (
    Assembler, Unit, decode_batch, open_extraction, plan_shards, progress_bar, shard_units,
)
from trainer.data import storage

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'manyview[ray]' (from a source checkout: pip install '.[ray]')"
CALLS_PER_ACTOR = 2  # encode calls in flight per actor: one running, one queued, so an actor never idles
BACKLOG_PER_ACTOR = 4  # decoded units waiting for an actor before the driver stops pulling from readers
GENERATOR_BACKPRESSURE = 8  # objects a reader may run ahead of the driver (two per unit: metadata, pixels)


class RayUnavailableError(ValueError):
    """``--engine ray`` asked for but Ray is not installed."""


def require_ray() -> Any:
    """The ``ray`` module, or ``RayUnavailableError`` saying how to install it."""
    try:
        import ray
    except ImportError as error:
        raise RayUnavailableError(f"--engine ray needs Ray, which is not installed ({error}); install it with "
                                  f"{INSTALL_HINT}, or run with --engine local") from error
    return ray


def connect(address: str | None) -> bool:
    """Join the cluster at ``address`` (``auto``, ``HOST:PORT``; None: ``RAY_ADDRESS``, else the cluster last
    started on this machine with ``ray start`` (Ray's ``/tmp/ray/ray_current_cluster``), else a new local Ray).
    One process should stay with one cluster: after a local Ray has been started and shut down, joining another
    cluster from the same process leaves its tasks unable to reach their owner (seen with Ray 2.60).

    Returns True when this call started Ray (the caller then shuts it down). Already connected: no-op.
    """
    ray = require_ray()
    if ray.is_initialized():
        return False
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=logger.isEnabledFor(logging.DEBUG))
    return True


# -- remote work (plain functions and a class; wrapped with ray.remote when the engine runs) -------------


def read_shard_units(url: str, shard_index: int, batch_size: int, chunk_size: int, finished: list[str],
                     spec: dict, input_format: str):
    """Reader: for each unit of the shard, yield ``(unit without image bytes, decode errors, pid)`` and
    then the decoded pixel batch, as two objects, so the driver never pulls pixels."""
    for unit in shard_units(url, shard_index, batch_size, chunk_size, set(finished)):
        batch, errors = decode_batch([sample.image for sample in unit.samples], spec, input_format)
        light = dataclasses.replace(unit, samples=[dataclasses.replace(s, image=None) for s in unit.samples])
        yield light, errors, os.getpid()
        yield batch


class EncoderActor:
    """One encoder session (``export.runtime.Encoder``) serving ``encode`` calls."""

    def __init__(self, encoder_dir: str, precision: str, threads: int | None) -> None:
        from export.runtime import Encoder

        # Ray sets CUDA_VISIBLE_DEVICES to the actor's own GPU, which is then device 0.
        self.encoder = Encoder(encoder_dir, precision=precision, threads=threads, device_id=0)

    def info(self) -> dict:
        encoder = self.encoder
        return {"dim": encoder.dim, "precision": encoder.precision, "provider": encoder.provider,
                "providers": encoder.providers, "describe": encoder.describe(), "pid": os.getpid(),
                "spec": encoder.preprocess.to_dict(), "input_format": encoder.input_format}

    def encode(self, batch: np.ndarray, batch_size: int) -> tuple[np.ndarray | None, int]:
        """``(L2-normalised vectors or None for an empty batch, this actor's pid)``."""
        vectors = self.encoder.encode_batch(batch, batch_size) if len(batch) else None
        return vectors, os.getpid()


# -- the driver ---------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _ShardRun:
    """One attempt at one shard: its reader, the units it announced, the vectors that came back."""

    shard_index: int
    generator: Any
    assembler: Assembler | None  # made once the encoder's dim is known
    units: dict[int, tuple[Unit, list, int]] = dataclasses.field(default_factory=dict)
    vectors: dict[int, tuple[Any, int]] = dataclasses.field(default_factory=dict)
    received: int = 0  # objects taken from the reader (two per unit)
    assembled: int = 0  # units handed to the assembler, in order
    reading: bool = True
    alive: bool = True


def _plan_workers(ray: Any, actors: int | None, readers: int | None) -> tuple[int, int, dict]:
    """``(actors, readers, actor resource options)`` from the cluster's resources and the flags."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    count = actors or gpus or max(1, cpus // 2)
    actor_cpus = 1 if cpus > count else 0  # leave readers a CPU on a one-CPU machine
    # Readers never take the CPUs the actors need, so a restarted actor always finds one free (readers
    # blocked on back-pressure would otherwise hold them while waiting for that very actor).
    options = {"num_gpus": 1, "num_cpus": actor_cpus} if gpus else {"num_cpus": actor_cpus}
    return count, readers or max(1, cpus - count * actor_cpus), options


def extract_ray(
    encoder_dir: str | os.PathLike,
    data_spec: str | list[str],
    output_dir: str | os.PathLike,
    batch_size: int = 64,
    dtype: str = "float16",
    chunk_size: int = 8192,
    precision: str = "auto",
    threads: int | None = None,
    progress: bool = True,
    address: str | None = None,
    actors: int | None = None,
    readers: int | None = None,
    max_attempts: int = 3,
    on_unit: Callable[[dict], None] | None = None,
) -> dict:
    """Embed every decodable image of ``data_spec`` into ``output_dir`` on Ray; the same output (and the
    same summary keys, plus ``engine``, ``actors``, ``readers``, ``retried_shards`` and ``startup_seconds``:
    from the call to the first encoded unit) as ``extract``.

    ``on_unit`` (tests, monitoring) is called by the driver after each unit is assembled with
    ``{"shard", "chunk", "units", "reader_pid", "actor_pid"}``.
    """
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be positive, got {batch_size} and {chunk_size}")
    ray = require_ray()
    started = time.perf_counter()
    plan, classes = plan_shards(data_spec)
    directory = os.path.abspath(os.fspath(encoder_dir))
    # The readers need only preprocess.json (read here, which also checks the directory before any actor starts).
    described = read_preprocess(directory)
    spec = Preprocess.from_dict(described).to_dict()
    input_format = str(described.get("input_format", FLOAT_NCHW))
    started_ray = connect(address)
    pool: list = []
    driver = None
    try:
        count, reader_count, actor_options = _plan_workers(ray, actors, readers)
        actor_class = ray.remote(EncoderActor).options(max_restarts=4, max_task_retries=4, **actor_options)
        pool = [actor_class.remote(directory, precision, threads) for _ in range(count)]
        pending_info = pool[0].info.remote()
        mine = [i for i in range(len(plan)) if i not in done_shards(output_dir)]
        driver = _Driver(ray, pool, plan, classes, output_dir, spec, input_format, batch_size, chunk_size,
                         reader_count, max_attempts, on_unit)
        driver.begin(mine)  # the readers start while the actors load the encoder
        try:
            info = ray.get(pending_info)
        except ray.exceptions.RayError as error:
            raise ValueError(f"the encoder actor could not load {directory!r} (is it there on every node?): "
                             f"{error}") from error
        if (info["spec"], info["input_format"]) != (spec, input_format):
            raise ValueError(f"the encoder actors read another preprocess.json than {directory!r}: is the directory "
                             "the same on every node?")
        open_extraction(output_dir, encoder_dir, info["precision"], info["provider"], info["dim"], plan, data_spec,
                        dtype, chunk_size)
        logger.info("ray: %d of %d shard(s) to extract with %d actor(s) (%s) and %d reader(s)", len(mine), len(plan),
                    count, info["describe"], reader_count)
        with progress_bar(plan, mine, progress) as bar:
            driver.run(info["dim"], bar)
    finally:
        if driver is not None:
            driver.stop()
        for actor in pool:
            ray.kill(actor)
        if started_ray:
            ray.shutdown()
    seconds = time.perf_counter() - started
    complete = False
    try:
        finalize(output_dir)
        complete = True
    except ValueError as pending:
        logger.info("not complete: %s", pending)
    return {
        "output": storage.describe(output_dir), "engine": "ray", "rank": 0, "world_size": 1, "shards": len(mine),
        "written": driver.written, "skipped": driver.skipped, "seconds": round(seconds, 3),
        "images_per_second": round(driver.written / seconds, 1) if seconds > 0 else None,
        "encoder": info["describe"], "precision": info["precision"], "provider": info["provider"],
        "providers": info["providers"], "actors": count, "readers": reader_count,
        "startup_seconds": round(driver.first_unit - started, 3) if driver.first_unit else None,
        "retried_shards": driver.retried, "complete": complete,
    }


class _Driver:
    """The scheduling loop: readers in flight, units dispatched to actors, shards assembled in order."""

    def __init__(self, ray: Any, pool: list, plan: Sequence[str], classes: Sequence[str], output_dir: Any, spec: dict,
                 input_format: str, batch_size: int, chunk_size: int, readers: int, max_attempts: int,
                 on_unit: Callable[[dict], None] | None) -> None:
        self.ray, self.pool, self.plan, self.classes, self.output_dir = ray, pool, plan, classes, output_dir
        self.spec, self.input_format, self.batch_size, self.chunk_size = spec, input_format, batch_size, chunk_size
        self.readers, self.max_attempts, self.on_unit = readers, max_attempts, on_unit
        self.reader = ray.remote(read_shard_units).options(
            num_cpus=1, max_retries=0, _generator_backpressure_num_objects=GENERATOR_BACKPRESSURE)
        self.runs: list[_ShardRun] = []
        self.waiting: collections.deque = collections.deque()  # shard indices not started
        self.backlog: collections.deque = collections.deque()  # (run, seq, pixels ref) waiting for an actor
        self.in_flight: dict[Any, tuple[_ShardRun, int, int]] = {}  # encode ref -> (run, seq, actor)
        self.load = [0] * len(pool)
        self.attempts: collections.Counter = collections.Counter()
        self.written = self.skipped = self.retried = self.units_done = 0
        self.first_unit: float | None = None  # perf_counter() when the first unit was assembled
        self.errors: list[Exception] = []
        self.dim = 0

    def begin(self, shards: Sequence[int]) -> None:
        """Queue ``shards`` and start the first readers (before the output is opened: they only read)."""
        self.waiting.extend(shards)
        self._start_readers()

    def stop(self) -> None:
        """Cancel readers still running (after an error; a finished run has none)."""
        for run in self.runs:
            if run.reading:
                self.ray.cancel(run.generator)

    def _start_readers(self) -> None:
        while self.waiting and sum(run.reading for run in self.runs) < self.readers:
            self._start(self.waiting.popleft())

    def run(self, dim: int, bar: Any) -> None:
        """Schedule until every queued shard is written (or failed for good); raises the first lasting error."""
        self.dim, self.bar = dim, bar
        while self.waiting or self.runs:
            self._start_readers()
            self._dispatch()
            pulling = len(self.backlog) < BACKLOG_PER_ACTOR * len(self.pool)
            generators = [run.generator for run in self.runs if run.reading and pulling]
            waitables = generators + list(self.in_flight)
            if not waitables:  # cannot happen unless a unit went missing: fail loudly rather than spin
                raise RuntimeError(f"ray engine stalled with {len(self.runs)} shard(s) open and nothing in flight")
            ready, _ = self.ray.wait(waitables, num_returns=1, timeout=1.0, fetch_local=False)
            for item in ready:
                if item in self.in_flight:
                    self._encoded(item)
                else:
                    self._read(next(run for run in self.runs if run.generator is item))
        if self.errors:
            raise self.errors[0]

    def _start(self, shard_index: int) -> None:
        self.attempts[shard_index] += 1
        finished = [name for name in part_names(self.output_dir) if name.startswith(f"{shard_index:06d}-")]
        generator = self.reader.remote(self.plan[shard_index], shard_index, self.batch_size, self.chunk_size, finished,
                                       self.spec, self.input_format)
        self.runs.append(_ShardRun(shard_index, generator, None))

    def _dispatch(self) -> None:
        while self.backlog and min(self.load) < CALLS_PER_ACTOR:
            run, seq, pixels = self.backlog.popleft()
            if not run.alive:
                continue
            actor = min(range(len(self.pool)), key=self.load.__getitem__)
            self.load[actor] += 1
            self.in_flight[self.pool[actor].encode.remote(pixels, self.batch_size)] = (run, seq, actor)

    def _read(self, run: _ShardRun) -> None:
        """Take the reader's next object: a unit's metadata (fetched here) or its pixels (sent to an actor)."""
        try:
            ref = next(run.generator)
        except StopIteration:
            run.reading = False
            return
        seq, is_pixels = divmod(run.received, 2)
        run.received += 1
        if is_pixels:
            self.backlog.append((run, seq, ref))
            return
        try:
            unit, errors, pid = self.ray.get(ref)
        except self.ray.exceptions.RayError as error:
            self._failed(run, error)
            return
        run.units[seq] = (unit, errors, pid)

    def _encoded(self, ref: Any) -> None:
        run, seq, actor = self.in_flight.pop(ref)
        self.load[actor] -= 1
        if not run.alive:
            return
        try:
            run.vectors[seq] = self.ray.get(ref)
        except self.ray.exceptions.RayError as error:
            self._failed(run, error)
            return
        self._assemble(run)

    def _assemble(self, run: _ShardRun) -> None:
        if run.assembler is None:
            run.assembler = Assembler(self.output_dir, self.plan, self.classes, self.dim)
            self.first_unit = self.first_unit or time.perf_counter()
        while run.assembled in run.units and run.assembled in run.vectors:
            unit, errors, reader_pid = run.units.pop(run.assembled)
            vectors, actor_pid = run.vectors.pop(run.assembled)
            written = run.assembler.written
            run.assembler.add(unit, errors, vectors)
            self.written += run.assembler.written - written
            run.assembled += 1
            self.units_done += 1
            self.bar.update(len(unit.samples))
            if self.on_unit is not None:
                self.on_unit({"shard": unit.shard_index, "chunk": unit.chunk, "units": self.units_done,
                              "reader_pid": reader_pid, "actor_pid": actor_pid})
            if unit.shard_end:
                self.skipped += run.assembler.skipped
                run.alive = False
                self.runs.remove(run)
                return

    def _failed(self, run: _ShardRun, error: Exception) -> None:
        """A reader or an encode call of ``run`` failed: retry the shard from its first unwritten chunk when
        the failure is the system's (a dead worker, node or object), else keep the error for the end."""
        run.alive = False
        self.runs.remove(run)
        if run.reading:  # an encode call failed while the reader runs on: stop it (its units are redone)
            self.ray.cancel(run.generator)
        shard, url = run.shard_index, self.plan[run.shard_index]
        cause: BaseException | None = error
        while isinstance(cause, self.ray.exceptions.RayTaskError):  # a task failed, or an argument it needed
            cause = cause.cause
        if not isinstance(cause, self.ray.exceptions.RayError):  # our code raised: the data is at fault
            self.errors.append(cause if isinstance(cause, ValueError) else ValueError(f"{url}: {error}"))
            return
        if self.attempts[shard] >= self.max_attempts:
            self.errors.append(ValueError(f"shard {url!r} failed {self.attempts[shard]} time(s), last: {error}; "
                                          "re-run the same command to resume"))
            return
        logger.warning("shard %s: %s; retrying from its first unwritten chunk", url, type(error).__name__)
        self.retried += 1
        self.waiting.appendleft(shard)
