"""Export a saved model for fine-tuning in timm, torchvision or open_clip: a folder that the plain library loads
with its own documented call, no manyview import (``python -m export --format timm|torchvision|open_clip``).

What each format writes into the output folder (``model.safetensors`` 0644 under the usual umask, carrying the
model card in its metadata, plus ``README.md`` with the exact loading lines):

    timm         ``config.json`` (architecture, ``model_args``, ``pretrained_cfg`` with mean/std/input size) +
                 ``model.safetensors`` -> ``timm.create_model("local-dir:DIR", pretrained=True)`` (num_classes=0).
                 Backbones: ``vit-*-cifar``, ``timm:<name>``, torchvision ``resnet18/34/50`` (timm's ResNet has the
                 same keys). ``pretrained=True`` is what loads the weights: without it timm builds the architecture
                 with random weights and says nothing, so the README says it twice.
    torchvision  ``model.safetensors`` (the constructor's ``state_dict``, no ``fc``) + the lines that build the
                 model in README.md (``resnet18/34/50``, and ``resnet18/34-cifar`` whose 3x3 stride-1 stem without
                 max-pool is part of those lines).
    open_clip    ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``) + ``model.safetensors`` ->
                 ``open_clip.create_model_and_transforms("local-dir:DIR")``, for image-text models (clip, siglip,
                 lit, coca). The image tower maps to open_clip's own towers: an ``open_clip:<name>`` visual as it
                 is, a timm trunk through open_clip's ``TimmModel`` (``timm_model_name`` + ``timm_proj: linear``)
                 when the timm name alone rebuilds it, a ViT with custom sizes (``vit-*-cifar``) converted to
                 open_clip's ``VisionTransformer``; the text tower is open_clip's ``TextTransformer`` already
                 (``custom_text``: the keys stay ``text.*``). The learned logit scale (and SigLIP's bias) come from
                 the model card, open_clip's initial values where it has none. CoCa models are open_clip CoCa
                 weights under ``coca.``: the prefix is stripped.

Nothing is declared done on faith: before the folder is moved into place, the README's loading lines are run on
the staged folder with the plain library and its features are compared with the manyview model's on random
inputs (min cosine >= ``MIN_COSINE``, image and text); a disagreement fails the export and leaves the output as
it was. Backbones with no library equivalent (``cnn-small``, split-view, patch-grid, layer-normed, register
tokens for open_clip, ...) raise ``UnsupportedExport`` naming the formats that do work and the ONNX export.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

FORMATS = ("timm", "torchvision", "open_clip")
WEIGHTS_NAME = "model.safetensors"
README_NAME = "README.md"
TIMM_CONFIG = "config.json"
OPEN_CLIP_CONFIG = "open_clip_config.json"
MIN_COSINE = 0.9999
CHECK_BATCH = 5
TORCHVISION_RESNETS = {"resnet18": 18, "resnet34": 34, "resnet50": 50}
CIFAR_RESNETS = {"resnet18-cifar": 18, "resnet34-cifar": 34}
CLIP_INIT_SCALE = 1 / 0.07  # open_clip's initial logit scale (the multiplier) for CLIP
SIGLIP_INIT_SCALE, SIGLIP_INIT_BIAS = 10.0, -10.0  # open_clip's (and the paper's) SigLIP initial values
ONNX_HINT = "the ONNX export (python -m export --model RUN/model --output DIR) carries the whole encoder"


class UnsupportedExport(ValueError):
    """The model has no equivalent in the requested library."""


class ExportMismatch(RuntimeError):
    """The model as the library loads it disagrees with the manyview model; nothing was written."""


@dataclass
class _Plan:
    """What one format writes and how its README loads it."""

    state: dict[str, torch.Tensor]
    configs: dict[str, dict]
    loading_code: str  # python lines with {path}; define ``model`` (and ``tokenizer`` for open_clip)
    encode_image: Callable  # (loaded model, normalised pixels [N, C, H, W]) -> features [N, D]
    feature: str  # "embedding" (what the ONNX encoder returns) or "backbone" (before image_head / projection)
    encode_text: Callable | None = None  # (loaded model, tokens [N, L]) -> [N, D]
    notes: list[str] = field(default_factory=list)
    usage: str = ""


def export_fine_tune(model_dir: str, output_dir: str, fmt: str, seed: int = 0) -> dict:
    """Write ``model_dir`` (a ``RUN/model``) as a ``fmt`` folder at ``output_dir``; returns
    ``{"format", "output", "files", "feature", "image": {"min_cosine"}, "text": {...} (image-text only)}``.

    Raises ``FileNotFoundError`` for a missing model, ``UnsupportedExport`` when the library has no equivalent of
    the model and ``ExportMismatch`` when the loaded folder disagrees with the model; ``output_dir`` is then left
    as it was."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS} (or onnx)")
    from trainer.models import load_model
    from trainer.models.embedding import replace_directory

    model, saved = load_model(model_dir)
    plan = {"timm": _timm_plan, "torchvision": _torchvision_plan, "open_clip": _open_clip_plan}[fmt](model, saved)
    output_dir = os.path.abspath(output_dir)
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{fmt}-", dir=parent)
    os.chmod(staging, 0o755)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        _write_weights(os.path.join(staging, WEIGHTS_NAME), plan.state, saved)
        for name, content in plan.configs.items():
            with open(os.path.join(staging, name), "w", encoding="utf-8") as handle:
                json.dump(content, handle, indent=2)
        report = _check(plan, model, staging, seed)
        with open(os.path.join(staging, README_NAME), "w", encoding="utf-8") as handle:
            handle.write(_readme(fmt, plan, saved, output_dir, report))
        replace_directory(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"format": fmt, "output": output_dir, "files": sorted(os.listdir(output_dir)), "feature": plan.feature,
            **report}


def loading_code(readme_text: str) -> str:
    """The first ```python block of an export's README.md: the loading lines (what the export itself ran)."""
    match = re.search(r"```python\n(.*?)```", readme_text, re.S)
    if match is None:
        raise ValueError("README.md has no ```python block")
    return match.group(1)


# -- refusals -----------------------------------------------------------------------------------------------------


def _refuse_structure(model, fmt: str) -> None:
    """Encoders that are more than one library backbone have no library equivalent in any format."""
    config = model.config
    reasons = []
    if config.colour_space is not None or config.view_channels is not None:
        reasons.append("a split-view encoder (colour conversion + one backbone per channel group; CMC)")
    if config.patch_grid is not None:
        reasons.append("a patch-grid encoder (the backbone on a grid of patches, mean-pooled; CPC)")
    if config.backbone_norm is not None:
        reasons.append("a backbone whose batch norms were replaced by layer norm (backbone_norm: layer)")
    if reasons:
        raise UnsupportedExport(f"{fmt} has no equivalent of {reasons[0]}; {ONNX_HINT}")


def _no_equivalent(name: str, fmt: str, works: str) -> UnsupportedExport:
    return UnsupportedExport(f"backbone {name!r} has no {fmt} equivalent; {works}; {ONNX_HINT}")


def _formats_for(name: str) -> str:
    """Which fine-tuning formats take the image backbone ``name`` (for refusal messages)."""
    if name in CIFAR_RESNETS:
        return "--format torchvision exports it (its stem is part of the README's lines)"
    if name in TORCHVISION_RESNETS:
        return "--format timm and --format torchvision export it"
    if name.startswith("open_clip:"):
        return "--format open_clip exports it within an image-text model"
    if name.startswith("vit-") or name.startswith("timm:"):
        return "--format timm exports it"
    return "no fine-tuning format does (it is manyview's own network)"


def _feature(model) -> str:
    """What the exported image backbone returns compared with the manyview embedding."""
    return "embedding" if model.image_head is None and model.image_projection is None else "backbone"


# -- timm ---------------------------------------------------------------------------------------------------------


def _timm_module(model, fmt: str) -> nn.Module:
    """The backbone as a timm model (torchvision ResNets are rebuilt as timm's ResNet: the same keys)."""
    import timm

    name = model.config.backbone
    if getattr(model, "coca", None) is not None:
        raise UnsupportedExport(f"a CoCa model is one open_clip CoCa; --format open_clip exports it; {ONNX_HINT}")
    _refuse_structure(model, fmt)
    if name in TORCHVISION_RESNETS:
        module = timm.create_model(name, pretrained=False, num_classes=0, in_chans=model.config.channels)
        module.load_state_dict(model.backbone.state_dict())
        return module
    if isinstance(getattr(model.backbone, "pretrained_cfg", None), dict):  # built by timm.create_model
        return model.backbone
    works = ("timm's ResNet has no 3x3 stride-1 stem without max-pool; " + _formats_for(name)
             if name in CIFAR_RESNETS else _formats_for(name))
    raise _no_equivalent(name, fmt, works)


def _call(loaded: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return loaded(x)


def _json_safe(value):
    return json.loads(json.dumps(value))


def _timm_plan(model, saved: dict) -> _Plan:
    from timm.models import get_model_args

    module = _timm_module(model, "timm")
    config = model.config
    try:
        args = _json_safe(get_model_args(module))
    except (TypeError, ValueError) as error:
        raise UnsupportedExport(f"the timm model's arguments cannot be written to config.json ({error}); "
                                f"{ONNX_HINT}") from error
    cfg = module.pretrained_cfg
    architecture = cfg["architecture"]
    args.update(num_classes=0, in_chans=config.channels)
    timm_config = {
        "architecture": architecture,
        "num_classes": 0,
        "num_features": int(module.num_features),
        "model_args": args,
        # Preprocessing as manyview evaluated it: shorter side to image_size (bicubic), centre crop, mean/std.
        "pretrained_cfg": {
            "tag": "manyview", "custom_load": False,
            "input_size": [config.channels, config.image_size, config.image_size],
            "fixed_input_size": bool(cfg.get("fixed_input_size", False)),
            "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
            "mean": list(config.mean), "std": list(config.std), "num_classes": 0,
            "first_conv": cfg.get("first_conv"), "classifier": cfg.get("classifier"),
        },
    }
    code = (
        "import timm\n\n"
        "# pretrained=True is what loads model.safetensors: without it timm builds random weights, silently.\n"
        'model = timm.create_model("local-dir:{path}", pretrained=True)\n'
        "model.eval()\n"
        "data_config = timm.data.resolve_model_data_config(model)  # input size, mean, std of this export\n"
        "transform = timm.data.create_transform(**data_config, is_training=False)\n"
    )
    usage = (
        "# fine-tune with a new classifier head (the backbone weights load, the head starts fresh):\n"
        'model = timm.create_model("local-dir:{path}", pretrained=True, num_classes=10)\n'
    )
    notes = _feature_notes(model)
    return _Plan(state={k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
                 configs={TIMM_CONFIG: timm_config}, loading_code=code, encode_image=_call,
                 feature=_feature(model), notes=notes, usage=usage)


def _feature_notes(model) -> list[str]:
    if _feature(model) == "embedding":
        return []
    parts = [name for name, module in (("image_head", model.image_head), ("image_projection", model.image_projection))
             if module is not None]
    return [f"This folder holds the image backbone only: the manyview embedding adds {' and '.join(parts)} on top "
            "(the ONNX export has the whole encoder; --format open_clip keeps the projection of image-text models)."]


# -- torchvision --------------------------------------------------------------------------------------------------


def _torchvision_plan(model, saved: dict) -> _Plan:
    name = model.config.backbone
    if getattr(model, "coca", None) is not None:
        raise UnsupportedExport(f"a CoCa model is one open_clip CoCa; --format open_clip exports it; {ONNX_HINT}")
    _refuse_structure(model, "torchvision")
    if name not in TORCHVISION_RESNETS and name not in CIFAR_RESNETS:
        raise _no_equivalent(name, "torchvision", _formats_for(name))
    depth = TORCHVISION_RESNETS.get(name) or CIFAR_RESNETS[name]
    channels = model.config.channels
    lines = ["import torch", "import torchvision", "from safetensors.torch import load_file", "",
             f"model = torchvision.models.resnet{depth}(weights=None)"]
    if name in CIFAR_RESNETS:
        lines += ["# CIFAR stem (SimCLR appendix B.9): 3x3 stride-1 first conv, no max-pool",
                  f"model.conv1 = torch.nn.Conv2d({channels}, 64, kernel_size=3, stride=1, padding=1, bias=False)",
                  "model.maxpool = torch.nn.Identity()"]
    elif channels != 3:
        lines.append(f"model.conv1 = torch.nn.Conv2d({channels}, 64, kernel_size=7, stride=2, padding=3, bias=False)")
    lines += ["model.fc = torch.nn.Identity()  # features; replace by a new nn.Linear to fine-tune a classifier",
              f'model.load_state_dict(load_file("{{path}}/{WEIGHTS_NAME}"))',
              "model.eval()",
              "",
              "from torchvision.transforms import v2 as T",
              "transform = T.Compose([",
              f"    T.Resize({model.config.image_size}, interpolation=T.InterpolationMode.BICUBIC),",
              f"    T.CenterCrop({model.config.image_size}),",
              "    T.ToImage(), T.ToDtype(torch.float32, scale=True),",
              f"    T.Normalize(mean={list(model.config.mean)}, std={list(model.config.std)}),",
              "])"]
    feature_dim = model.feature_dim
    usage = (f"# fine-tune a classifier: model.fc = torch.nn.Linear({feature_dim}, num_classes)\n")
    state = {k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}
    return _Plan(state=state, configs={}, loading_code="\n".join(lines) + "\n", encode_image=_call,
                 feature=_feature(model), notes=_feature_notes(model), usage=usage)


# -- open_clip ----------------------------------------------------------------------------------------------------


def _logit_values(saved: dict, weights: dict | None = None) -> tuple[float, float | None]:
    """(logit scale multiplier, logit bias or None): the model card's, else open_clip's initial values."""
    siglip = saved.get("objective") == "siglip" or saved.get("loss") == "siglip"
    scale = saved.get("logit_scale")
    if scale is None:
        scale = SIGLIP_INIT_SCALE if siglip else CLIP_INIT_SCALE
    bias = saved.get("logit_bias")
    if bias is None and siglip:
        bias = SIGLIP_INIT_BIAS
    return float(scale), (None if bias is None else float(bias))


def _preprocess_cfg(config) -> dict:
    return {"size": config.image_size, "mode": "RGB", "mean": list(config.mean), "std": list(config.std),
            "interpolation": "bicubic", "resize_mode": "shortest"}


def _text_cfg(config) -> dict:
    text = config.text
    return {"context_length": text.context_length, "vocab_size": text.vocab_size, "width": text.width,
            "heads": text.heads, "layers": text.layers}


def _open_clip_plan(model, saved: dict) -> _Plan:
    config = model.config
    if model.text is None:
        objective = saved.get("objective", "unknown")
        raise UnsupportedExport(f"open_clip holds image-text models; this model (objective {objective!r}) is "
                                f"image-only: {_formats_for(config.backbone)}; {ONNX_HINT}")
    if config.channels != 3:
        raise UnsupportedExport(f"open_clip takes RGB images, this model {config.channels}-channel ones; {ONNX_HINT}")
    scale, bias = _logit_values(saved)
    if getattr(model, "coca", None) is not None:
        model_cfg = {**json.loads(json.dumps(config.coca)), "custom_text": True}  # custom_text: the factory's CoCa
        state = {k[len("coca."):]: v for k, v in _state(model).items()}
    else:
        _refuse_structure(model, "open_clip")
        if model.image_head is not None:
            raise UnsupportedExport(f"open_clip's image towers have no image_head (Linear-BN-ReLU layers); "
                                    f"{ONNX_HINT}")
        vision_cfg, visual_state = _open_clip_visual(model)
        model_cfg = {"embed_dim": model.embed_dim, "custom_text": True, "quick_gelu": False,
                     "vision_cfg": vision_cfg, "text_cfg": _text_cfg(config)}
        state = {**visual_state, **{f"text.{k}": v for k, v in _state(model.text).items()}}
    model_cfg["init_logit_scale"] = math.log(scale)
    state["logit_scale"] = torch.tensor(math.log(scale))
    if bias is not None:
        model_cfg["init_logit_bias"] = bias
        state["logit_bias"] = torch.tensor(bias)
    code = (
        "import open_clip\n\n"
        'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{path}")\n'
        'tokenizer = open_clip.get_tokenizer("local-dir:{path}")\n'
        "model.eval()\n"
    )
    usage = ("# features: model.encode_image(preprocess(image).unsqueeze(0)), model.encode_text(tokenizer(texts))\n"
             "# logits as trained: model.logit_scale.exp() * image @ text.T (+ model.logit_bias for SigLIP)\n")
    if getattr(model, "coca", None) is not None:
        usage += ("# captions (CoCa; open_clip's generate needs `pip install transformers`):\n"
                  "# open_clip.decode(model.generate(preprocess(image).unsqueeze(0))[0])\n")
    return _Plan(state=state, configs={OPEN_CLIP_CONFIG: {"model_cfg": model_cfg,
                                                          "preprocess_cfg": _preprocess_cfg(config)}},
                 loading_code=code, encode_image=lambda loaded, x: loaded.encode_image(x),
                 encode_text=lambda loaded, tokens: loaded.encode_text(tokens), feature="embedding", usage=usage)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def _open_clip_visual(model) -> tuple[dict, dict[str, torch.Tensor]]:
    """(open_clip ``vision_cfg``, ``visual.*`` weights) of the image tower + projection."""
    config = model.config
    name = config.backbone
    projection = model.image_projection
    if name.startswith("open_clip:"):
        import open_clip

        if projection is not None:
            raise UnsupportedExport(f"{name}'s visual tower projects itself; open_clip has no place for manyview's "
                                    f"extra image_projection; {ONNX_HINT}")
        base = open_clip.get_model_config(name.partition(":")[2])
        if base is None:
            raise UnsupportedExport(f"open_clip has no model config {name.partition(':')[2]!r}")
        if base.get("quick_gelu"):
            # open_clip's quick_gelu switches both towers; manyview's text tower uses GELU.
            raise UnsupportedExport(f"{name} uses QuickGELU, which open_clip applies to the text tower too, and "
                                    f"manyview's text tower uses GELU; {ONNX_HINT}")
        vision_cfg = {**base["vision_cfg"], "image_size": config.image_size}
        return vision_cfg, {f"visual.{k}": v for k, v in _state(model.backbone).items()}
    module = _timm_module(model, "open_clip")  # open_clip's timm tower, or its ViT converted from timm's
    from timm.models import get_model_args

    architecture = module.pretrained_cfg["architecture"]
    args = {k: v for k, v in get_model_args(module).items() if k not in ("num_classes", "in_chans")}
    default_pool = _default_global_pool(architecture)
    if args.get("global_pool", default_pool) == default_pool:
        args.pop("global_pool", None)
    if not args:
        # open_clip's TimmModel rebuilds the trunk from the name alone. With a projection an empty pool keeps the
        # trunk's own; without one (LiT's locked tower) TimmModel passes the pool to timm as it is, and "" would
        # mean no pooling at all, so the trunk's default is named.
        pool = "" if projection is not None else (default_pool or "avg")
        vision_cfg = {"timm_model_name": architecture, "timm_model_pretrained": False, "timm_pool": pool,
                      "timm_proj": "linear" if projection is not None else "none", "timm_proj_bias": False,
                      "image_size": config.image_size}
        state = {f"visual.trunk.{k}": v for k, v in _state(module).items()}
        if projection is not None:
            state["visual.head.proj.weight"] = projection.weight.detach().cpu().contiguous()
        return vision_cfg, state
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(module, VisionTransformer):
        return _vit_to_open_clip(module, projection, config.image_size)
    raise UnsupportedExport(f"open_clip's timm tower rebuilds a timm model from its name alone; {name!r} was built "
                            f"with {sorted(args)} besides: {_formats_for(name)}; {ONNX_HINT}")


def _default_global_pool(architecture: str):
    import timm
    from timm.models import get_model_args

    return get_model_args(timm.create_model(architecture, pretrained=False, num_classes=0)).get("global_pool")


def _vit_to_open_clip(vit, projection: nn.Linear | None, image_size: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """timm ``VisionTransformer`` -> open_clip ``VisionTransformer`` weights (same computation): qkv is open_clip's
    in_proj (both [q; k; v] rows), the patch embedding's bias moves into the patch positions' positional embedding
    (open_clip's conv has none), timm's final norm is ``ln_post``."""
    if getattr(vit, "num_reg_tokens", 0):
        raise UnsupportedExport("open_clip's ViT has no register tokens; --format timm exports this image backbone; "
                                + ONNX_HINT)
    if vit.cls_token is None or getattr(vit, "no_embed_class", False) or vit.global_pool not in ("token", "avg") \
            or getattr(vit, "attn_pool", None) is not None or getattr(vit, "dynamic_img_size", False):
        raise UnsupportedExport("open_clip's ViT needs a class token with its own position, token or avg pooling "
                                "and a fixed image size; --format timm exports this image backbone; " + ONNX_HINT)
    source = _state(vit)
    width = vit.embed_dim
    heads = vit.blocks[0].attn.num_heads
    final_ln_after_pool = isinstance(vit.fc_norm, nn.LayerNorm)
    post = vit.fc_norm if final_ln_after_pool else vit.norm
    no_ln_pre = not isinstance(vit.norm_pre, nn.LayerNorm)
    ls = any(".ls1." in key for key in source)
    vision_cfg = {"image_size": image_size, "patch_size": vit.patch_embed.patch_size[0], "width": width,
                  "layers": len(vit.blocks), "head_width": width // heads,
                  "mlp_ratio": vit.blocks[0].mlp.fc1.out_features / width, "no_ln_pre": no_ln_pre,
                  "pool_type": "tok" if vit.global_pool == "token" else "avg",
                  "final_ln_after_pool": final_ln_after_pool, "norm_kwargs": {"eps": post.eps}}
    if ls:
        vision_cfg["ls_init_value"] = 1.0  # only makes open_clip build the layer scales; the weights set them
    target: dict[str, torch.Tensor] = {}
    pos = source.pop("pos_embed")[0].clone()
    bias = source.pop("patch_embed.proj.bias", None)
    if bias is not None:
        pos[1:] += bias
    target["visual.positional_embedding"] = pos
    target["visual.class_embedding"] = source.pop("cls_token").reshape(width)
    target["visual.conv1.weight"] = source.pop("patch_embed.proj.weight")
    renames = {"norm1": "ln_1", "norm2": "ln_2", "attn.qkv.weight": "attn.in_proj_weight",
               "attn.qkv.bias": "attn.in_proj_bias", "attn.proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc",
               "mlp.fc2": "mlp.c_proj", "ls1.gamma": "ls_1.gamma", "ls2.gamma": "ls_2.gamma"}
    post_name = "fc_norm" if final_ln_after_pool else "norm"
    for key in list(source):
        block = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if block:
            rest = block.group(2)
            for old, new in renames.items():
                if rest == old or rest.startswith(old + "."):
                    target[f"visual.transformer.resblocks.{block.group(1)}.{new}{rest[len(old):]}"] = source.pop(key)
                    break
        elif key.startswith(post_name + "."):
            target[f"visual.ln_post.{key[len(post_name) + 1:]}"] = source.pop(key)
        elif key.startswith("norm_pre.") and not no_ln_pre:
            target[f"visual.ln_pre.{key[len('norm_pre.'):]}"] = source.pop(key)
    if source:
        raise UnsupportedExport(f"open_clip's ViT has no place for {sorted(source)[:4]} of this timm ViT; --format "
                                f"timm exports this image backbone; {ONNX_HINT}")
    for index in range(len(vit.blocks)):  # timm's qkv_bias=False: open_clip's attention always has a bias
        target.setdefault(f"visual.transformer.resblocks.{index}.attn.in_proj_bias", torch.zeros(3 * width))
    target["visual.proj"] = (projection.weight.detach().t().contiguous() if projection is not None
                             else torch.eye(width))
    return vision_cfg, target


# -- writing and checking -----------------------------------------------------------------------------------------


def _write_weights(path: str, state: dict[str, torch.Tensor], saved: dict) -> None:
    from safetensors.torch import save_file

    from trainer.models.embedding import make_ordinary_file

    save_file({k: v.contiguous() for k, v in state.items()}, path,
              metadata={"format": "pt", "model_card": json.dumps(saved, sort_keys=True)})
    make_ordinary_file(path)


def _random_tokens(batch: int, length: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Rows shaped like real ones: start token, random body, end token (the argmax the tower pools at), padding."""
    tokens = torch.zeros(batch, length, dtype=torch.int64)
    for row in range(batch):
        end = int(torch.randint(1, length, (1,), generator=generator))
        tokens[row, 0] = vocab - 2
        tokens[row, 1:end] = torch.randint(1, vocab - 2, (end - 1,), generator=generator)
        tokens[row, end] = vocab - 1
    return tokens


def _min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1).min())


def _check(plan: _Plan, model, directory: str, seed: int) -> dict:
    """Run the README's loading lines on ``directory`` and compare the library model's features with manyview's."""
    namespace: dict = {}
    # The README's own lines are what is checked, so a mistake in them fails the export, not the user.
    exec(compile(plan.loading_code.format(path=directory), "<README.md>", "exec"), namespace)  # noqa: S102
    loaded = namespace["model"]
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    x = torch.randn(CHECK_BATCH, config.channels, config.image_size, config.image_size, generator=generator)
    with torch.no_grad():
        reference = model.encode_image(x) if plan.feature == "embedding" else model.backbone(x)
        report = {"image": {"min_cosine": _min_cosine(reference, plan.encode_image(loaded, x)), "batch": CHECK_BATCH}}
        if plan.encode_text is not None:
            text = config.text
            tokens = _random_tokens(CHECK_BATCH, text.context_length, text.vocab_size, generator)
            got = plan.encode_text(loaded, tokens)
            report["text"] = {"min_cosine": _min_cosine(model.encode_text(tokens), got), "batch": CHECK_BATCH}
    for tower, figures in report.items():
        if not figures["min_cosine"] >= MIN_COSINE:
            raise ExportMismatch(f"the {tower} features of the exported folder, loaded as its README says, disagree "
                                 f"with the manyview model: min cosine {figures['min_cosine']:.6f} < {MIN_COSINE}; "
                                 "nothing was written")
    return report


_MODES = {3: "RGB", 1: "Grayscale (L)"}


def _readme(fmt: str, plan: _Plan, saved: dict, output_dir: str, report: dict) -> str:
    library = {"timm": "timm", "torchvision": "torchvision", "open_clip": "open_clip"}[fmt]
    config = saved["model"]
    files = [WEIGHTS_NAME, *plan.configs]
    figures = ", ".join(f"{tower} min cosine {f['min_cosine']:.6f}" for tower, f in report.items())
    lines = [
        f"# {saved.get('objective', 'manyview')} / {config['backbone']} for {library}",
        "",
        f"Exported by manyview (`python -m export --format {fmt}`) from a model trained with objective "
        f"`{saved.get('objective')}` on backbone `{config['backbone']}`, {config['image_size']} px, "
        f"{saved.get('steps', '?')} steps. Files: {', '.join(f'`{name}`' for name in files)} (the weights carry the "
        "manyview model card in their safetensors metadata, key `model_card`). No manyview import is needed.",
        "",
        "## Load",
        "",
        "```python",
        plan.loading_code.format(path=output_dir).rstrip("\n"),
        "```",
        "",
        f"The export ran these lines on this folder and compared the features with the manyview model on "
        f"random inputs: {figures}.",
        "",
        "## Preprocess",
        "",
        f"{_MODES.get(config['channels'], str(config['channels']) + '-channel')} image, shorter side "
        f"resized to {config['image_size']} px (bicubic), centre crop {config['image_size']} x {config['image_size']}, "
        f"scaled to [0, 1], mean {config['mean']}, std {config['std']}.",
    ]
    if plan.usage:
        lines += ["", "## Use", "", "```", plan.usage.format(path=output_dir).rstrip("\n"), "```"]
    if plan.notes:
        lines += ["", "## Note", "", *plan.notes]
    return "\n".join(lines) + "\n"
