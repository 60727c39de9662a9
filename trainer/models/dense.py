"""Dense features of the registry's backbones: the spatial map a backbone has before its global pooling.

Dense objectives (PixPro, PatchNCE) train on these maps while the exported model stays the usual
``EmbeddingModel`` (the globally pooled backbone), so kNN, ONNX export and serving are unchanged.

* ``feature_map(module, images) -> [N, C, h, w]``: the last map, the one the backbone pools.
    ``SmallConvNet`` (cnn-small): ``module.features``; torchvision ResNets: stem + ``layer1..layer4`` (what
    ``avgpool`` sees); timm ViTs: the final (normed) patch tokens, class/register tokens dropped, reshaped to
    the patch grid; other timm models: ``forward_features`` when it returns a map.
* ``feature_maps(module, images, stages) -> [maps]``: intermediate maps by stage index (negative counts from
  the end): cnn-small's four conv stages, a ResNet's four ``layerK``, a timm model's ``feature_info`` entries
  (a ViT's blocks, taken before the final norm).
* ``stage_count(module)``: how many stages ``feature_maps`` knows for that backbone; ``cells(map)``: [N, C, h, w]
  -> [N, h*w, C], the layout the dense losses take.

Anything else (open_clip towers, CMC's split encoders) raises ``ValueError`` naming what is supported.
"""
from __future__ import annotations

import torch
from torch import nn

from .backbones import SmallConvNet

_SUPPORTED = "cnn-small, torchvision ResNets (resnet18-cifar, resnet18/34/50, ...) and timm models (timm:<name>, vit-*-cifar)"


def _is_torchvision_resnet(module: nn.Module) -> bool:
    import torchvision

    return isinstance(module, torchvision.models.ResNet)


def _is_timm(module: nn.Module) -> bool:
    return type(module).__module__.startswith("timm.") and hasattr(module, "forward_features")


def _unsupported(module: nn.Module) -> ValueError:
    return ValueError(f"dense features: backbone {type(module).__name__} has no spatial feature map here; "
                      f"supported: {_SUPPORTED}")


def _tokens_to_grid(module: nn.Module, tokens: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """[N, prefix + h*w, C] ViT tokens -> [N, C, h, w] patch-token grid."""
    patch_embed = module.patch_embed
    if hasattr(patch_embed, "dynamic_feat_size"):
        h, w = patch_embed.dynamic_feat_size(image_size)
    else:
        h, w = patch_embed.grid_size
    patches = tokens[:, getattr(module, "num_prefix_tokens", 1):]
    if patches.shape[1] != h * w:
        raise ValueError(f"dense features: {patches.shape[1]} patch tokens do not form a {h}x{w} grid")
    return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


def _resnet_stages(module: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    x = module.maxpool(module.relu(module.bn1(module.conv1(images))))
    stages = []
    for layer in (module.layer1, module.layer2, module.layer3, module.layer4):
        x = layer(x)
        stages.append(x)
    return stages


def feature_map(module: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The spatial map [N, C, h, w] that ``module`` globally pools into its [N, C] feature."""
    if isinstance(module, SmallConvNet):
        return module.features(images)
    if _is_torchvision_resnet(module):
        return _resnet_stages(module, images)[-1]
    if _is_timm(module):
        features = module.forward_features(images)
        if features.dim() == 4:  # timm CNNs: already [N, C, h, w]
            return features
        if features.dim() == 3 and hasattr(module, "patch_embed"):
            return _tokens_to_grid(module, features, tuple(images.shape[-2:]))
    raise _unsupported(module)


def cells(map_: torch.Tensor) -> torch.Tensor:
    """[N, C, h, w] -> [N, h*w, C] (row-major cells, the order of ``crop_geometry.cell_centres``)."""
    return map_.flatten(2).transpose(1, 2)


def stage_count(module: nn.Module) -> int:
    """Number of stages ``feature_maps`` can return for ``module``."""
    if isinstance(module, SmallConvNet):
        return sum(isinstance(layer, nn.ReLU) for layer in module.features)
    if _is_torchvision_resnet(module):
        return 4
    if _is_timm(module) and hasattr(module, "forward_intermediates") and hasattr(module, "feature_info"):
        return len(module.feature_info)
    raise _unsupported(module)


def resolve_stages(module: nn.Module, stages: list[int]) -> list[int]:
    """Stage indices (negative from the end) -> sorted-as-given non-negative indices; out of range is an error."""
    count = stage_count(module)
    resolved = []
    for stage in stages:
        index = int(stage) + count if int(stage) < 0 else int(stage)
        if not 0 <= index < count:
            raise ValueError(f"dense features: stage {stage} out of range for {type(module).__name__} "
                             f"with {count} stages (0..{count - 1}, or -{count}..-1)")
        resolved.append(index)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"dense features: stages {stages} name the same stage twice")
    return resolved


def feature_maps(module: nn.Module, images: torch.Tensor, stages: list[int]) -> list[torch.Tensor]:
    """Maps [N, C_s, h_s, w_s] at ``stages`` (indices into the backbone's stages, negative from the end)."""
    resolved = resolve_stages(module, stages)
    if isinstance(module, SmallConvNet):
        outputs, x = [], images
        for layer in module.features:
            x = layer(x)
            if isinstance(layer, nn.ReLU):  # a stage ends at its ReLU (before the next stage's pool)
                outputs.append(x)
        return [outputs[i] for i in resolved]
    if _is_torchvision_resnet(module):
        outputs = _resnet_stages(module, images)
        return [outputs[i] for i in resolved]
    order = sorted(set(resolved))
    maps = module.forward_intermediates(images, indices=order, intermediates_only=True, output_fmt="NCHW")
    by_stage = dict(zip(order, maps))
    return [by_stage[i] for i in resolved]


@torch.no_grad()
def probe_shapes(module: nn.Module, image_size: int, stages: list[int] | None = None, channels: int = 3) -> list[tuple[int, int, int]]:
    """(C, h, w) of the final map (``stages=None``) or of each stage's map, from two dummy images in eval mode;
    raises ``ValueError`` early for a backbone without dense features."""
    was_training = module.training
    module.eval()
    try:
        images = torch.zeros(2, channels, image_size, image_size)
        maps = [feature_map(module, images)] if stages is None else feature_maps(module, images, stages)
    finally:
        module.train(was_training)
    return [tuple(int(d) for d in m.shape[1:]) for m in maps]
