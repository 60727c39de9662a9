"""Teachers for tests of ``distill``: a randomly initialised cnn-small saved as a RUN/model directory and exported
to ONNX (float32 NCHW and uint8 NHWC input), in seconds. ``distill`` refuses to build without a teacher, so every
test that builds it with its recipe (the smoke run, the recipe check) passes ``teacher=make_teacher(...)["onnx"]``.
"""
from __future__ import annotations

from pathlib import Path


def make_teacher(root: Path, image_size: int = 32, mean: list[float] | None = None, std: list[float] | None = None,
                 seed: int = 0) -> dict[str, str]:
    """Write ``root/model`` (RUN/model), ``root/onnx`` and ``root/onnx_uint8`` for one random cnn-small; returns the
    three paths by those names. Its batch norms hold statistics of a shifted random batch (not the identity), so a
    teacher wrongly left in training mode gives other embeddings."""
    import torch

    from export.onnx import export_model
    from trainer.models import EmbeddingModel, ModelConfig, save_model

    root = Path(root)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = EmbeddingModel(ModelConfig(backbone="cnn-small", image_size=image_size, mean=mean, std=std))
        model.train()
        with torch.no_grad():
            model.encode_image(torch.randn(16, 3, image_size, image_size) * 2 + 1)
    save_model(model.eval(), str(root / "model"), {"objective": "test"})
    export_model(str(root / "model"), str(root / "onnx"))
    export_model(str(root / "model"), str(root / "onnx_uint8"), uint8_input=True)
    return {"model": str(root / "model"), "onnx": str(root / "onnx"), "onnx_uint8": str(root / "onnx_uint8")}
