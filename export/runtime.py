"""ONNX Runtime encoder: images (and texts) -> L2-normalised embeddings, without torch.

Reads an encoder directory written by ``python -m export``; its layout, names and formats are the
contract of ``export/contract.py``.

Variants (``precision``): ``"auto"`` takes the fp16 variant on a GPU when it was exported, the int8
image encoder on a CPU when it was exported (the export keeps it only when it met its quality bound on
held-out images; 2-3x the float32 throughput on the CPUs measured), else fp32; ``"fp32"``, ``"fp16"`` and ``"int8"`` ask
for one variant (``"fp32"`` is the way to refuse int8). One log line names the variant and the provider
the image encoder runs (``image encoder: int8 variant on CPUExecutionProvider``).

Execution providers: TensorRT (when its libraries load), CUDA (when a driver is present), always CPU as
the fallback. On CUDA batches run through IO binding (outputs stay on the device until copied once).
Serving code (``index``, ``app``) depends on this module, so it must never import torch.
"""
from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from export.contract import (  # noqa: F401 - re-exported: the runtime's public names
    EXPORT_FLAGS, FLOAT_NCHW, IMAGE_MODEL, INPUT_FORMATS, ONNX_INPUT_TYPES, PREPROCESS, TEXT_MODEL, UINT8_NHWC,
    VOCAB_NAME, EncoderError, Preprocess, describe_execution, empty_batch, input_dtype, input_shape, int8_agreement,
    l2_normalize, prepare_image, read_preprocess, variant_files,
)

logger = logging.getLogger(__name__)

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
PRECISIONS = ("auto", "fp32", "fp16", "int8")


def _library_loads(*names: str) -> bool:
    """Whether one of the shared libraries ``names`` can be loaded.

    onnxruntime-gpu lists CUDA/TensorRT providers even on machines without a GPU and then logs a loud
    error when the session falls back; probing the libraries first keeps CPU-only machines quiet.
    """
    for name in names:
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        return True
    return False


def _cuda_driver_present() -> bool:
    return _library_loads("libcuda.so.1")


def _tensorrt_present() -> bool:
    if os.environ.get("MANYVIEW_TENSORRT", "1").lower() in ("0", "false", "no", "off"):
        return False
    return _library_loads("libnvinfer.so.10", "libnvinfer.so.8")


def provider_name(provider: Any) -> str:
    """The name of a provider given as ``"Name"`` or ``("Name", {options})``."""
    return provider[0] if isinstance(provider, (tuple, list)) else str(provider)


def default_providers(device_id: int = 0, fp16: bool = False) -> list:
    """Best first: TensorRT (its libraries load), CUDA (onnxruntime offers it and a driver is present),
    and always CPU as the fallback. GPU providers come with their options (device ``device_id``)."""
    import onnxruntime as ort

    providers: list = [CPU]
    available = ort.get_available_providers()
    if CUDA in available and _cuda_driver_present():
        preload = getattr(ort, "preload_dlls", None)
        if preload is not None:
            # Without torch in the process nothing else loads the pip-installed CUDA/cuDNN libraries.
            try:
                preload()
            except Exception as error:  # noqa: BLE001 - a failed preload only means CPU fallback
                logger.debug("onnxruntime.preload_dlls failed: %s", error)
        providers.insert(0, (CUDA, {"device_id": device_id}))
        if TENSORRT in available and _tensorrt_present():
            cache = Path(os.environ.get("MANYVIEW_TRT_CACHE", Path.home() / ".cache" / "manyview" / "tensorrt"))
            providers.insert(0, (TENSORRT, {
                "device_id": device_id, "trt_fp16_enable": bool(fp16),
                "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
            }))
    return providers


def session_options(threads: int | None = None, fp16: bool = False):
    """ONNX Runtime options for throughput: all graph optimisations, sequential execution, ``threads``
    intra-op threads (None: onnxruntime's default, one per physical core), one inter-op thread, the
    memory arena and memory-pattern planning, denormals flushed to zero.

    Measured on the 2-core AMD EPYC (tests/benchmarks/RESULTS_onnx.md): the "all" level (NCHWc layout
    transforms for convolutions) is 1.3x the "extended" level for resnet18-cifar; spinning, the arena
    and denormal flushing made no measurable difference there (kept: denormals do occur in trained nets).

    float16 graphs stop at the "extended" level: the remaining level only adds CPU layout transforms
    (NCHWc), which do nothing for GPU providers, and onnxruntime 1.31's CPU provider crashes (SIGSEGV)
    applying them to float16 ViT graphs.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if fp16 else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads:
        options.intra_op_num_threads = int(threads)
    options.enable_mem_pattern = True
    options.enable_cpu_mem_arena = True
    # Denormal floats take a slow microcode path on x86; flushing them changes nothing above 1e-38.
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    options.log_severity_level = 3  # errors only: fallbacks are reported once, by us
    return options


def _static_dim(shape: Sequence[Any]) -> int | None:
    """The last dimension of an ONNX shape when it is a fixed integer, else None."""
    if not shape:
        return None
    last = shape[-1]
    return int(last) if isinstance(last, int) else None


class Encoder:
    """Embeds images (and, for image-text models, texts) with the exported ONNX encoders.

    ``providers``: onnxruntime providers, best first (default ``default_providers()``). ``precision``:
    ``"auto"`` (on a GPU the fp16 variant when it was exported; on a CPU the int8 image encoder when it was
    exported, which the export kept only after it met its bound on held-out images, see
    ``info["parity"]["image_int8"]``; else fp32), ``"fp32"`` (also the way to refuse int8), ``"fp16"`` or
    ``"int8"``. ``precision`` / ``provider`` / ``execution`` / ``describe()`` say what was chosen.
    ``io_binding``: run batches through IO binding (default: on when a GPU provider is in use).
    ``threads``: intra-op CPU threads (default: onnxruntime's choice). ``device_id``: the GPU to use.
    """

    def __init__(
        self,
        onnx_dir: str | os.PathLike,
        providers: Sequence[Any] | None = None,
        precision: str = "auto",
        io_binding: bool | None = None,
        threads: int | None = None,
        device_id: int = 0,
    ) -> None:
        self.directory = Path(onnx_dir).expanduser().resolve()
        if not self.directory.is_dir():
            raise FileNotFoundError(f"encoder directory {str(self.directory)!r} does not exist")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self._info = read_preprocess(self.directory)
        self._preprocess = Preprocess.from_dict(self._info)
        self._input_format = str(self._info.get("input_format", FLOAT_NCHW))
        self._output = str(self._info.get("output", "embedding"))
        explicit = providers is not None
        providers = list(providers) if explicit else default_providers(device_id)
        self._requested = precision
        self._precision = self._choose_precision(precision, providers)
        if not explicit and self._precision == "fp16":
            providers = default_providers(device_id, fp16=True)  # TensorRT builds fp16 engines for it
        files = variant_files(self._info, self._precision)
        self._files = files
        image_path = self.directory / files["image"]
        if not image_path.is_file():
            raise FileNotFoundError(f"encoder file {str(image_path)!r} does not exist")
        self._providers = providers
        self._threads = threads
        self._image_session = self._open(image_path)
        on_gpu = provider_name(self._image_session.get_providers()[0]) != CPU
        self._io_binding = on_gpu if io_binding is None else bool(io_binding)
        self._device = ("cuda", device_id) if on_gpu else ("cpu", 0)
        self._image_input = self._check_input(self._image_session, image_path, self._info.get("image_input", "pixels"))
        self._check_image_input(self._image_session, image_path)
        self._dim = self._resolve_dim(self._image_session, image_path)
        self._log_choice()
        self._text_session = None
        self._tokenizer = None
        text_name = files.get("text")
        text_path = self.directory / text_name if text_name else None
        if text_path is not None and text_path.is_file():
            self._text_session = self._open(text_path)
            self._text_input = self._check_input(self._text_session, text_path, self._info.get("text_input", "tokens"))
            self._check_output_dim(self._text_session, text_path)
            self._tokenizer = self._load_tokenizer()
            logger.info("text encoder: %s on %s", text_path.name, (self._text_session.get_providers() or [CPU])[0])
        elif text_name and text_name != TEXT_MODEL:
            raise FileNotFoundError(f"encoder file {str(text_path)!r} does not exist")

    # -- construction helpers -------------------------------------------------------------------

    def _choose_precision(self, precision: str, providers: Sequence[Any]) -> str:
        variants = self._info.get("variants") or {}
        if precision in EXPORT_FLAGS and precision not in variants:
            raise EncoderError(f"{self.directory} has no {precision} variant; export it with {EXPORT_FLAGS[precision]}")
        if precision != "auto":
            return precision
        on_gpu = any(provider_name(p) in (CUDA, TENSORRT) for p in providers)
        if on_gpu:
            return "fp16" if "fp16" in variants else "fp32"
        if "int8" in variants:
            int8_image = self.directory / variant_files(self._info, "int8")["image"]
            if int8_image.is_file():
                return "int8"
            logger.warning("%s lists an int8 variant but %s is missing; using fp32", PREPROCESS, int8_image.name)
        return "fp32"

    def _log_choice(self) -> None:
        """One line naming the variant and provider the image encoder runs (and why, when chosen by auto)."""
        line = f"image encoder: {self.describe()}"
        if self._requested == "auto" and self._precision == "int8":
            agreement = int8_agreement(self._info)
            figure = f"min cosine {agreement:.4f} to fp32 on the export's held-out images; " if agreement else ""
            line += f" (auto picks int8 on a CPU; {figure}precision='fp32' / --precision fp32 refuses it)"
        logger.info("%s", line)

    def _open(self, path: Path):
        import onnxruntime as ort

        try:
            options = session_options(self._threads, fp16=self._precision == "fp16")
            session = ort.InferenceSession(str(path), sess_options=options, providers=self._providers)
        except Exception as error:  # onnxruntime raises its own exception types for corrupt models
            raise EncoderError(f"cannot load ONNX model {str(path)!r}: {error}") from error
        used = session.get_providers()
        logger.debug("%s (%s) runs on %s", path.name, self._precision, used[0] if used else "no provider")
        requested = provider_name(self._providers[0]) if self._providers else CPU
        if requested != CPU and used and used[0] != requested:
            logger.warning("%s was requested for %s but onnxruntime uses %s", requested, path.name, used[0])
        return session

    def _check_input(self, session, path: Path, expected: str) -> str:
        names = [node.name for node in session.get_inputs()]
        if expected not in names:
            raise EncoderError(f"{path} has inputs {names}, but {PREPROCESS} names the input {expected!r}")
        outputs = [node.name for node in session.get_outputs()]
        if self._output not in outputs:
            raise EncoderError(f"{path} has outputs {outputs}, but {PREPROCESS} names the output {self._output!r}")
        return expected

    def _check_image_input(self, session, path: Path) -> None:
        """The graph's input type and fixed sizes must agree with preprocess.json (an encoder/preprocess
        mismatch would otherwise surface as a cryptic onnxruntime error on the first batch)."""
        node = next(node for node in session.get_inputs() if node.name == self._image_input)
        expected_type = ONNX_INPUT_TYPES[self._input_format]
        if node.type != expected_type:
            raise EncoderError(
                f"encoder/preprocess mismatch: {path.name} takes {node.type} but {PREPROCESS} says "
                f"input_format {self._input_format!r} ({expected_type})"
            )
        spec = self._preprocess
        layout, expected = input_shape(spec, self._input_format)
        shape = list(node.shape)
        if len(shape) != 4 or any(isinstance(d, int) and d != e for d, e in zip(shape[1:], expected)):
            raise EncoderError(
                f"encoder/preprocess mismatch: {path.name} input {self._image_input!r} has shape {shape} but "
                f"{PREPROCESS} (image_size={spec.image_size}, channels={spec.channels}) implies {layout} = "
                f"[N, {', '.join(map(str, expected))}]"
            )

    def _output_shape(self, session) -> Sequence[Any]:
        return next(node.shape for node in session.get_outputs() if node.name == self._output)

    def _resolve_dim(self, session, path: Path) -> int:
        """The embedding dimension: ``embed_dim`` from preprocess.json, checked against the model."""
        static = _static_dim(self._output_shape(session))
        declared = self._info.get("embed_dim")
        if declared is None:
            if static is None:
                raise EncoderError(f"{PREPROCESS} has no embed_dim and {path.name} has a dynamic output size")
            return static
        declared = int(declared)
        if static is not None and static != declared:
            raise EncoderError(
                f"{PREPROCESS} says embed_dim={declared} but {path} outputs {static}-dimensional embeddings"
            )
        return declared

    def _check_output_dim(self, session, path: Path) -> None:
        static = _static_dim(self._output_shape(session))
        if static is not None and static != self._dim:
            raise EncoderError(f"{path} outputs {static}-dimensional embeddings but the image encoder's are {self._dim}")

    def _load_tokenizer(self):
        from export.tokenizer import ClipTokenizer

        spec = self._info.get("tokenizer")
        if not spec:
            raise EncoderError(f"{self.directory} holds {TEXT_MODEL} but {PREPROCESS} describes no tokenizer")
        if spec.get("type", "clip_bpe") != "clip_bpe":
            raise EncoderError(f"unsupported tokenizer type {spec.get('type')!r} in {PREPROCESS}")
        vocab = self.directory / spec.get("vocab_file", VOCAB_NAME)
        if not vocab.is_file():
            raise FileNotFoundError(f"tokenizer vocabulary {str(vocab)!r} does not exist")
        return ClipTokenizer(vocab, context_length=int(spec.get("context_length", 77)))

    # -- public API ------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Embedding dimension D."""
        return self._dim

    @property
    def has_text(self) -> bool:
        """Whether this model has a text encoder (image-text models)."""
        return self._text_session is not None

    @property
    def preprocess(self) -> Preprocess:
        """How images are resized and normalised before the image encoder."""
        return self._preprocess

    @property
    def input_format(self) -> str:
        """``"float32_nchw"`` (normalised pixels) or ``"uint8_nhwc"`` (the graph normalises)."""
        return self._input_format

    @property
    def precision(self) -> str:
        """The variant in use: ``"fp32"``, ``"fp16"`` or ``"int8"``."""
        return self._precision

    @property
    def io_binding(self) -> bool:
        """Whether batches run through IO binding."""
        return self._io_binding

    @property
    def info(self) -> dict:
        """The parsed ``preprocess.json`` (includes the free-form ``model`` card)."""
        return self._info

    @property
    def providers(self) -> list[str]:
        """The execution providers the image session actually uses, best first."""
        return list(self._image_session.get_providers())

    @property
    def provider(self) -> str:
        """The execution provider the image encoder runs on (e.g. ``"CPUExecutionProvider"``)."""
        used = self._image_session.get_providers()
        return str(used[0]) if used else CPU

    @property
    def execution(self) -> dict:
        """What runs: ``{"variant", "provider", "image_model", "text_model", "requested"}`` (for logs,
        ``embeddings.json``, ``index.json`` and the app)."""
        return {
            "variant": self._precision,
            "provider": self.provider,
            "image_model": self._files["image"],
            "text_model": self._files.get("text") if self._text_session is not None else None,
            "requested": self._requested,
        }

    def describe(self) -> str:
        """E.g. ``"int8 variant on CPUExecutionProvider"``."""
        return describe_execution(self._precision, self.provider)

    def _run(self, session, name: str, batch: np.ndarray, source: str) -> np.ndarray:
        if self._io_binding:
            output = self._run_bound(session, name, batch)
        else:
            output = session.run([self._output], {name: batch})[0]
        if output.ndim != 2 or output.shape[1] != self._dim:
            raise EncoderError(
                f"{source} produced embeddings of shape {tuple(output.shape)} but {PREPROCESS} says embed_dim={self._dim}"
            )
        return output.astype(np.float32, copy=False)

    def _run_bound(self, session, name: str, batch: np.ndarray) -> np.ndarray:
        """One batch through IO binding: the input is copied to the device once, the output is allocated
        there by onnxruntime and copied back once (no per-node host round trips or extra staging)."""
        import onnxruntime as ort

        device, device_id = self._device
        binding = session.io_binding()
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(batch, device, device_id))
        binding.bind_output(self._output, device, device_id)
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def prepare(self, images: Sequence[Any]) -> np.ndarray:
        """PIL images (any size or mode) -> one input batch in this encoder's ``input_format``."""
        if not images:
            return empty_batch(self._preprocess, self._input_format)
        return np.stack([prepare_image(image, self._preprocess, self._input_format) for image in images])

    def encode_batch(self, batch: np.ndarray, batch_size: int = 64, normalize: bool = True) -> np.ndarray:
        """Embed prepared inputs (see ``prepare``): float32 [N, C, H, W] normalised pixels, or uint8
        [N, H, W, C] for ``uint8_nhwc`` encoders. Returns float32 [N, D], L2-normalised unless
        ``normalize=False`` (then the graph's raw outputs, e.g. to look at their norms)."""
        dtype = input_dtype(self._input_format)
        batch = np.asarray(batch)
        if batch.dtype != dtype and not (dtype == np.float32 and np.issubdtype(batch.dtype, np.floating)):
            raise EncoderError(f"this encoder takes {np.dtype(dtype).name} input ({self._input_format}), got {batch.dtype}")
        batch = np.ascontiguousarray(batch, dtype=dtype)
        step = max(1, batch_size)
        chunks = [
            self._run(self._image_session, self._image_input, batch[start : start + step], self._files["image"])
            for start in range(0, len(batch), step)
        ]
        if not chunks:
            return np.zeros((0, self._dim), dtype=np.float32)
        output = np.concatenate(chunks)
        return l2_normalize(output) if normalize else output

    def encode_images(self, images: Iterable[Any], batch_size: int = 64, normalize: bool = True) -> np.ndarray:
        """Embed PIL images (any size or mode); returns float32 [N, D], L2-normalised unless ``normalize=False``."""
        images = list(images)
        step = max(1, batch_size)
        chunks = [self.encode_batch(self.prepare(images[start : start + step]), step, normalize=normalize)
                  for start in range(0, len(images), step)]
        if not chunks:
            return np.zeros((0, self._dim), dtype=np.float32)
        return np.concatenate(chunks)

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """Token ids int64 [N, L] as the text encoder expects them."""
        if self._tokenizer is None:
            raise EncoderError(self._no_text_message())
        return self._tokenizer(list(texts))

    def encode_texts(self, texts: Sequence[str] | str, batch_size: int = 256, normalize: bool = True) -> np.ndarray:
        """Embed texts; returns float32 [N, D], L2-normalised unless ``normalize=False``. Raises
        EncoderError for image-only models."""
        if self._text_session is None:
            raise EncoderError(self._no_text_message())
        if isinstance(texts, str):
            texts = [texts]
        tokens = self.tokenize(texts)
        step = max(1, batch_size)
        chunks = [
            self._run(self._text_session, self._text_input, tokens[start : start + step], self._files["text"])
            for start in range(0, len(tokens), step)
        ]
        if not chunks:
            return np.zeros((0, self._dim), dtype=np.float32)
        output = np.concatenate(chunks)
        return l2_normalize(output) if normalize else output

    def _no_text_message(self) -> str:
        model = self._info.get("model")
        objective = model.get("objective", "unknown") if isinstance(model, dict) else "unknown"
        return (
            f"the model in {self.directory} (objective {objective!r}) has no text encoder "
            f"({TEXT_MODEL} is absent); text queries need an image-text model"
        )

    def __repr__(self) -> str:
        return (f"Encoder({str(self.directory)!r}, dim={self._dim}, has_text={self.has_text}, "
                f"precision={self._precision!r}, provider={self.provider!r})")
