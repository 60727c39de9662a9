"""Every objective's YAML recipe is a working run configuration: its options are all current option names of the
objective (no unknown keys, no deprecated aliases), and the objective it builds (on a small backbone) takes
real images through its own view recipe and the data pipeline's collate to a finite scalar loss with finite
gradients. A recipe option that an objective renamed or dropped, or a view recipe that stops producing what
``forward`` reads, fails here rather than in a user's run."""
import io
import os
import warnings

import pytest
import torch
from PIL import Image

import trainer.objectives as registry
from objective_fixtures import start_args
from trainer.config import TrainConfig, load_recipe, recipe_path
from trainer.data.pipeline import BuildViews, collate
from trainer.objectives import ObjectiveSpec, get_objective
from trainer.objectives.base import parse_options

# The objectives trainer/ registers (tests may register their own, without recipes).
BUILT_IN = sorted(key for key in registry.list_objectives() if get_objective(key).__module__.startswith("trainer."))
BATCH = 16  # divisible by moco's 8 BN splits, enough rows for every batch norm


def _config(key: str) -> TrainConfig:
    return load_recipe(recipe_path(key), TrainConfig(objective=key))


def _task_options(key: str, options: dict) -> list[tuple[str, dict]]:
    """(objective key, options mapping) of the recipe, and of each task inside a multitask recipe."""
    pairs = [(key, options)]
    if key == "multitask":
        pairs += [(task, dict((entry or {}).get("options") or {})) for task, entry in options["tasks"].items()]
    return pairs


def test_every_built_in_objective_is_registered_and_has_a_recipe():
    assert len(BUILT_IN) >= 58
    assert all(os.path.exists(recipe_path(key)) for key in BUILT_IN)


@pytest.mark.parametrize("key", BUILT_IN)
def test_recipe_sets_only_current_option_names(key):
    for objective, options in _task_options(key, _config(key).objective_options):
        options_type = get_objective(objective).Options
        deprecated = sorted(set(options) & set(getattr(options_type, "ALIASES", {})))
        assert not deprecated, f"{key} recipe: {objective} options {deprecated} are deprecated aliases"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a deprecation (or any other) warning while parsing fails the test
            parsed = parse_options(options_type, options, objective)
        for name, value in options.items():
            assert hasattr(parsed, name), f"{key} recipe: {objective} has no option {name!r}"


def _jpeg(seed: int, size: int) -> bytes:
    """A textured RGB photo-like image (smooth gradients plus noise), JPEG-encoded as in the shards."""
    generator = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size)
    base = torch.stack([ramp[None, :].expand(size, size), ramp[:, None].expand(size, size),
                        torch.rand((), generator=generator).expand(size, size)])
    pixels = (0.6 * base + 0.4 * torch.rand(3, size, size, generator=generator)).clamp(0, 1)
    buffer = io.BytesIO()
    Image.fromarray((pixels.permute(1, 2, 0) * 255).to(torch.uint8).numpy()).save(buffer, format="JPEG")
    return buffer.getvalue()


def _batch(recipe, size: int) -> dict:
    """The training pipeline's own stages on BATCH raw shard samples: decode, views + label + id, collate."""
    raw = [{"__key__": f"{i:06d}", "jpg": _jpeg(i, size), "cls": str(i % 10).encode(),
            "txt": f"a photo of a thing number {i % 10}".encode(), "id": str(i).encode()} for i in range(BATCH)]
    batch = collate(list(BuildViews(recipe)(raw)))
    assert batch.pop("skipped") == 0
    return batch


@pytest.mark.parametrize("key", BUILT_IN)
def test_recipe_views_feed_forward_to_a_finite_loss(key, tmp_path):
    config = _config(key)
    torch.manual_seed(0)
    backbone = "vit-micro-cifar" if get_objective(key).requires_patch_tokens else "cnn-small"  # ViT objectives
    start = start_args(key, tmp_path)
    spec = ObjectiveSpec(backbone=backbone, image_size=config.data.image_size, num_train_samples=1000,
                         total_steps=100, global_batch_size=BATCH, options={**config.objective_options, **start.options},
                         **start.spec)
    objective = get_objective(key).build(spec)
    size = objective.encoder.config.image_size
    batch = _batch(objective.views(), size)

    channels = len(objective.encoder.config.mean or (0, 0, 0))
    for name, value in batch.items():
        assert isinstance(value, torch.Tensor) and value.shape[0] == BATCH, name
        if value.is_floating_point():
            assert torch.isfinite(value).all(), f"{key}: view {name!r} has non-finite values"
        # Whole-image views (the model's input); per-view masks and prefix lengths ("keep/image") are not images.
        if name.rpartition("/")[2] in ("view0", "view1", "image") and value.dim() == 4:
            assert tuple(value.shape[1:]) == (channels, size, size), f"{key}: {name} {tuple(value.shape)}"

    objective.train()
    outputs = objective(batch)
    loss = outputs["loss"]
    assert loss.dim() == 0 and torch.isfinite(loss), f"{key}: loss {loss}"
    loss.backward()
    grads = [p.grad for p in objective.encoder.parameters() if p.grad is not None]
    assert grads, f"{key}: the loss sends no gradient to the exported encoder"
    assert all(torch.isfinite(g).all() for g in grads), f"{key}: non-finite encoder gradients"
    objective.before_optimizer_step(0, spec.total_steps)
    objective.after_step(0, spec.total_steps)  # momentum updates, queues, banks take the step's state
