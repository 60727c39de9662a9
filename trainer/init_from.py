"""Start from weights the user already has: ``--init-from PATH`` for every objective.

``PATH`` is one of
- a manyview model directory (``RUN/model``: ``config.json`` + ``model.safetensors``);
- a checkpoint directory (``RUN/checkpoints/step_N``): the model's part (``encoder.*``) of the objective's state;
  heads and momentum copies stay as the objective builds them (momentum copies are made from the loaded model);
- a local weights file (``.safetensors``, ``.pt`` / ``.pth`` / ``.bin``) written by the plain library for the
  chosen backbone: a timm or torchvision state dict (``torch.save(model.state_dict(), ...)``; a ``state_dict`` /
  ``model`` wrapper and DDP's ``module.`` prefix are unwrapped), or an open_clip model's (``visual.*`` and the
  text tower at the top level).

The model is made of parts: ``backbone``, ``image_head``, ``image_projection`` and ``text``. Every part the file
holds must match the model key for key and shape for shape; parts the file does not hold at all (the text tower
of an image-only file, a projection the objective adds) keep their fresh initialisation and are listed. The
library's classifier head (``fc``, ``head``, ... from timm's ``pretrained_cfg``) and open_clip's ``logit_scale`` /
``logit_bias`` are dropped and listed: the exported model has neither. Anything else that does not fit -- keys the
model lacks, keys of a held part that the file lacks, shapes that differ -- is listed and refused
(``InitFromError``) unless ``strict=False``, which loads what fits and warns about the rest. Nothing is
downloaded. Every process reads the same file, so all start from identical weights.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import torch
from torch import nn

log = logging.getLogger("manyview.init_from")

MODEL_PARTS = ("backbone", "image_head", "image_projection", "text", "coca")  # coca: a whole open_clip CoCa
IMAGE_PARTS = {"backbone", "coca"}
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
# open_clip's top-level text-tower names (CLIP keeps its text transformer unwrapped) and its loss scalars.
OPEN_CLIP_TEXT_KEYS = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection",
                       "attn_mask")
OPEN_CLIP_SCALARS = ("logit_scale", "logit_bias")
_LISTED = 8  # keys named per category in a message; the rest are counted


class InitFromError(ValueError):
    """``--init-from`` cannot be used as asked; the message says what does not fit and what to do."""


@dataclass
class InitReport:
    """What ``load_initial_weights`` did: the layout it recognised and every key it could not use."""

    path: str
    layout: str  # "manyview model" | "manyview checkpoint" | "open_clip" | "timm/torchvision"
    loaded: int = 0
    fresh_parts: list[str] = field(default_factory=list)  # model parts the file does not hold
    dropped: list[str] = field(default_factory=list)  # file keys the exported model has no place for, by design
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "key: file shape vs model shape"

    @property
    def problems(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        lines = [f"--init-from {self.path} ({self.layout}): loaded {self.loaded} tensors"]
        if self.fresh_parts:
            lines.append(f"  freshly initialised (not in the file): {', '.join(self.fresh_parts)}")
        for name, keys in (("dropped (no place in the exported model)", self.dropped),
                           ("missing from the file", self.missing), ("not in the model", self.unexpected),
                           ("shape differs", self.mismatched)):
            if keys:
                more = f" ... and {len(keys) - _LISTED} more" if len(keys) > _LISTED else ""
                lines.append(f"  {name} ({len(keys)}): {', '.join(keys[:_LISTED])}{more}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ reading
def _is_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(path, "model.safetensors"))


def _checkpoint_file(path: str) -> str | None:
    for name in ("model.safetensors", "pytorch_model.bin"):  # what Accelerate's save_state writes
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    return None


def _read_file(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickles with code in them, truncated files, not a torch file at all
        raise InitFromError(f"--init-from {path}: cannot read it as a torch weights file ({error})") from None
    # The usual wrappers around a state dict: training scripts' {"state_dict": ...} / {"model": ...}.
    while isinstance(loaded, dict) and not _is_state_dict(loaded):
        inner = [loaded[k] for k in ("state_dict", "model", "module", "model_state_dict")
                 if isinstance(loaded.get(k), dict)]
        if not inner:
            break
        loaded = inner[0]
    if not (isinstance(loaded, dict) and _is_state_dict(loaded)):
        raise InitFromError(f"--init-from {path}: holds no state dict (a mapping of parameter names to tensors); "
                            f"save one with torch.save(model.state_dict(), PATH)")
    return dict(loaded)


def _is_state_dict(mapping: dict) -> bool:
    return bool(mapping) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in mapping.items())


def read_state_dict(path: str) -> tuple[dict[str, torch.Tensor], str]:
    """The raw tensors at ``path`` and the layout they come in: "manyview model" (a RUN/model directory),
    "manyview checkpoint" (a RUN/checkpoints/step_N directory; only the exported model's ``encoder.*`` part,
    prefix removed) or "weights file" (a plain library's file, keys as the library wrote them)."""
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise InitFromError(f"--init-from {path}: no such file or directory")
    if os.path.isdir(path):
        if _is_model_dir(path):
            from safetensors.torch import load_file

            return load_file(os.path.join(path, "model.safetensors")), "manyview model"
        checkpoint = _checkpoint_file(path)
        if checkpoint is None:
            raise InitFromError(f"--init-from {path}: a directory that is neither a manyview model (RUN/model: "
                                f"config.json + model.safetensors) nor a checkpoint (RUN/checkpoints/step_N)")
        state = _read_file(checkpoint)
        encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        if not encoder:
            raise InitFromError(f"--init-from {path}: the checkpoint holds no model weights (no 'encoder.*' keys)")
        return encoder, "manyview checkpoint"
    if not path.endswith(WEIGHT_SUFFIXES):
        raise InitFromError(f"--init-from {path}: expected a weights file ({', '.join(WEIGHT_SUFFIXES)}), a RUN/model "
                            f"or a checkpoint directory")
    state = _read_file(path)
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, "weights file"


# ------------------------------------------------------------------------------------------------ mapping
def _classifier_prefixes(backbone: nn.Module) -> tuple[str, ...]:
    """Key prefixes of the classifier head a library's file has and our feature extractor does not."""
    names = set()
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier")  # timm names it: "head", "fc", "head.fc", ("head", "head_dist"), ...
    if classifier:
        names.update([classifier] if isinstance(classifier, str) else classifier)
    if not names and isinstance(getattr(backbone, "fc", None), nn.Identity):  # torchvision ResNets
        names.add("fc")
    return tuple(f"{name}." for name in sorted(names))


def _map_open_clip(state: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict, list[str]]:
    """open_clip keys -> ours: ``visual.*`` is the image tower (``visual.trunk.*`` + ``visual.head.proj`` for timm
    towers), the top-level text transformer (or CustomTextCLIP's ``text.*``) is ``text.*``."""
    mapped, dropped = {}, []
    timm_tower = any(k.startswith("visual.trunk.") for k in state)
    for key, value in state.items():
        if key in OPEN_CLIP_SCALARS:
            dropped.append(key)
        elif timm_tower and key.startswith("visual.trunk."):
            mapped["backbone." + key[len("visual.trunk."):]] = value
        elif timm_tower and key == "visual.head.proj.weight":
            mapped["image_projection.weight"] = value
        elif key.startswith("visual."):
            mapped["backbone." + key[len("visual."):]] = value
        elif key.startswith("text."):
            mapped[key] = value
        elif key.startswith(OPEN_CLIP_TEXT_KEYS):
            mapped["text." + key] = value
        else:
            mapped[key] = value  # reported as not in the model
    return mapped, dropped


def map_to_model(state: dict[str, torch.Tensor], layout: str, model: nn.Module) -> tuple[dict, str, list[str]]:
    """``state`` renamed to the keys of ``model`` (an ``EmbeddingModel``); returns (mapped, layout, dropped keys)."""
    if layout != "weights file":
        return state, layout, []
    if any(k.startswith("visual.") for k in state):
        mapped, dropped = _map_open_clip(state, model)
        layout = "open_clip"
    elif any(k.startswith(f"{part}.") for k in state for part in MODEL_PARTS) and _is_manyview_keys(state):
        return state, "manyview weights", []  # a model.safetensors copied out of RUN/model
    else:
        mapped = {"backbone." + k: v for k, v in state.items()}
        dropped = []
        layout = "timm/torchvision"
    classifier = tuple("backbone." + p for p in _classifier_prefixes(model.backbone))
    own = model.state_dict()
    for key in [k for k in mapped if k.startswith(classifier) and k not in own]:
        dropped.append(key[len("backbone."):])
        del mapped[key]
    return mapped, layout, dropped


def _is_manyview_keys(state: dict) -> bool:
    return all(k.split(".", 1)[0] in MODEL_PARTS for k in state)


def _part(key: str) -> str:
    head = key.split(".", 1)[0]
    return head if head in MODEL_PARTS else key


# ------------------------------------------------------------------------------------------------ loading
def _check_saved_backbone(path: str, model: nn.Module) -> None:
    """A RUN/model of another backbone gets a message naming both rather than a list of shape differences."""
    config_path = os.path.join(path, "config.json") if os.path.isdir(path) else None
    if not config_path or not os.path.isfile(config_path):
        return
    with open(config_path, encoding="utf-8") as handle:
        saved = (json.load(handle).get("model") or {}).get("backbone")
    wanted = getattr(getattr(model, "config", None), "backbone", None)
    if saved and wanted and saved != wanted:
        raise InitFromError(f"--init-from {path}: holds a {saved} model but this run builds {wanted}; pass "
                            f"--backbone {saved}, or --init-strict false to load only what fits")


def load_initial_weights(model: nn.Module, path: str, strict: bool = True) -> InitReport:
    """Load the weights at ``path`` into ``model`` (an ``EmbeddingModel``) as the module docstring describes;
    raises ``InitFromError`` listing what does not fit (``strict``), else loads what fits and logs the rest."""
    state, layout = read_state_dict(path)
    if strict:
        _check_saved_backbone(os.path.expanduser(path), model)
    mapped, layout, dropped = map_to_model(state, layout, model)
    own = model.state_dict()
    report = InitReport(path=path, layout=layout, dropped=sorted(dropped))
    held_parts = {_part(k) for k in mapped}
    report.fresh_parts = sorted({_part(k) for k in own} - held_parts)
    if not held_parts & IMAGE_PARTS:
        sample = ", ".join(sorted(state)[:3])
        raise InitFromError(f"--init-from {path}: holds no weights for the {getattr(model.config, 'backbone', '?')} "
                            f"backbone (its keys look like: {sample}); give a file of that backbone's library")
    report.unexpected = sorted(k for k in mapped if k not in own)
    report.missing = sorted(k for k in own if _part(k) in held_parts and k not in mapped)
    usable = {}
    for key, value in mapped.items():
        if key not in own:
            continue
        if tuple(value.shape) != tuple(own[key].shape):
            report.mismatched.append(f"{key}: {tuple(value.shape)} vs {tuple(own[key].shape)}")
        else:
            usable[key] = value
    if report.problems and strict:
        raise InitFromError(report.describe() + "\nrefused: these weights do not fit the model this run builds; fix "
                            "--backbone / the file, or pass --init-strict false to load only what fits")
    model.load_state_dict(usable, strict=False)
    report.loaded = len(usable)
    (log.warning if report.problems else log.info)("%s", report.describe())
    return report


def parse_strict(value: str | bool) -> bool:
    """``--init-strict`` values: true/false, yes/no, 1/0."""
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ("true", "yes", "1", "on"):
        return True
    if lowered in ("false", "no", "0", "off"):
        return False
    raise ValueError(f"--init-strict takes true or false, got {value!r}")
