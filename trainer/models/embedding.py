"""The exported part of every objective: an image encoder and, for image-text models, a text encoder.

Objectives hold an ``EmbeddingModel`` plus their training-only heads (projectors, predictors, queues);
``save_model`` writes just this model as ``config.json`` + ``model.safetensors``, the directory that
``trainer.evaluate`` and ``export`` read.

The image path is always ``encode_image(normalised RGB [N, C, H, W]) -> [N, D]``:
    backbone  (one backbone, or a ``ViewSplitEncoder``: colour conversion + one backbone per channel group,
               features concatenated; CMC; or a ``PatchGridEncoder``: the backbone on a grid of patches,
               mean-pooled; CPC)
    -> image_head        (optional Linear-BN-ReLU layers kept from a projection head; SimCLR v2)
    -> image_projection  (optional linear map into a shared image-text space; CLIP)
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .backbones import OPENAI_MEAN, OPENAI_STD, build_backbone
from .colour import ColourSpace
from .text import TextConfig, build_text_tower

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class ModelConfig:
    backbone: str = "resnet18-cifar"
    image_size: int = 32
    channels: int = 3
    mean: list[float] | None = None  # None: the backbone's default
    std: list[float] | None = None
    image_projection: int | None = None  # linear projection after the backbone (image-text models)
    text: TextConfig | None = None
    # Multiview input (CMC): convert the RGB input to this colour space in-graph ("rgb" | "lab" | "ycbcr";
    # None: no conversion) and give each channel group of ``view_channels`` its own backbone, e.g. [[0], [1, 2]]
    # is L vs ab of Lab. Either field set makes the backbone a ``ViewSplitEncoder``; both None: one backbone.
    colour_space: str | None = None
    view_channels: list[list[int]] | None = None
    # Projection-head layers exported with the encoder (SimCLR v2 fine-tunes from the middle of its head):
    # {"hidden_dim": int, "layers": int} -> layers x (Linear-BN-ReLU) after the backbone.
    image_head: dict | None = None
    # Patch-grid encoder (CPC): {"patch": P, "stride": S} splits the image into the grid of P x P patches at
    # stride S, encodes every patch with the backbone (built for P px input) and mean-pools the patch
    # features into the image's embedding (``PatchGridEncoder``). None: the backbone sees the whole image.
    patch_grid: dict | None = None
    # Normalisation in the backbone: None keeps the backbone's own (batch norm for CNNs); "layer" replaces every
    # BatchNorm2d by GroupNorm(1, C), layer norm over (C, H, W) per sample with a per-channel affine (CPC v2).
    backbone_norm: str | None = None
    # ViT backbones only: learnable register tokens (Darcet et al. 2024) and the exported feature, "token" (class
    # token) or "avg" (mean of the patch tokens), the pooling the objective's paper evaluates with; None: the
    # backbone's default.
    register_tokens: int = 0
    vit_pool: str | None = None
    # CoCa (Yu et al. 2022): open_clip's model config ({"embed_dim", "vision_cfg", "text_cfg", "multimodal_cfg"},
    # as in its model-config JSON). Set, the whole model is ``open_clip.CoCa`` under ``coca.*`` (image tower, text
    # tower, multimodal text decoder); ``backbone`` is then only the name the vision tower's sizes came from.
    coca: dict | None = None

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        data = dict(data)
        text = data.get("text")
        data["text"] = TextConfig(**text) if text else None
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


class ViewSplitEncoder(nn.Module):
    """Multiview image encoder (CMC): normalised RGB -> colour space -> channel groups -> one backbone each.

    ``forward_views`` returns the per-view features (the objective's per-view heads use them); ``forward``
    concatenates them in group order, the representation CMC evaluates and the exported feature.
    """

    def __init__(self, backbone: str, image_size: int, groups: list[list[int]], colour: ColourSpace | None):
        super().__init__()
        self.colour = colour
        self.groups = [list(group) for group in groups]
        built = [build_backbone(backbone, image_size, len(group)) for group in self.groups]
        self.encoders = nn.ModuleList([b.module for b in built])
        self.feature_dims = [b.feature_dim for b in built]
        self.feature_dim = sum(self.feature_dims)

    def forward_views(self, images: torch.Tensor) -> list[torch.Tensor]:
        """[N, C, H, W] normalised RGB -> one [N, feature_dims[v]] tensor per view."""
        converted = self.colour(images) if self.colour is not None else images
        return [encoder(converted[:, group]) for encoder, group in zip(self.encoders, self.groups)]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.forward_views(images), dim=1)


def grid_patches(images: torch.Tensor, patch: int, stride: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, Gh, Gw, C, patch, patch] (``Tensor.unfold``), Gh = (H - patch) // stride + 1; patch
    (i, j) is ``images[:, :, i*stride : i*stride + patch, j*stride : j*stride + patch]``."""
    return images.unfold(2, patch, stride).unfold(3, patch, stride).permute(0, 2, 3, 1, 4, 5)


class PatchGridEncoder(nn.Module):
    """An image encoder made of a patch encoder (CPC): image -> grid of overlapping patches -> ``encoder`` on
    every patch as one batch -> mean of the patch features, the image representation CPC evaluates.

    ``encode_grid`` gives the per-patch features the objective trains on.
    """

    def __init__(self, encoder: nn.Module, patch: int, stride: int):
        super().__init__()
        self.encoder = encoder
        self.patch, self.stride = patch, stride

    def encode_grid(self, patches: torch.Tensor) -> torch.Tensor:
        """[N, Gh, Gw, C, P, P] patches -> [N, Gh, Gw, D] features."""
        n, rows, cols = patches.shape[:3]
        features = self.encoder(patches.reshape(-1, *patches.shape[3:]))
        return features.reshape(n, rows, cols, features.shape[-1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grid = self.encode_grid(grid_patches(images, self.patch, self.stride))
        return grid.flatten(1, 2).mean(dim=1)


def _check_patch_grid(config: ModelConfig) -> tuple[int, int]:
    """(patch, stride) of ``config.patch_grid`` (stride defaults to patch // 2), validated and resolved."""
    unknown = sorted(set(config.patch_grid) - {"patch", "stride"})
    if unknown:
        raise ValueError(f"patch_grid takes patch and stride, got unknown {unknown}")
    if config.colour_space is not None or config.view_channels is not None:
        raise ValueError("patch_grid works with one plain backbone, not with colour_space / view_channels")
    if "patch" not in config.patch_grid:
        raise ValueError("patch_grid needs a patch size: {'patch': P, 'stride': S}")
    patch = int(config.patch_grid["patch"])
    stride = int(config.patch_grid.get("stride") or max(1, patch // 2))
    if not (0 < patch <= config.image_size and stride > 0):
        raise ValueError(f"patch_grid: need 0 < patch <= image_size ({config.image_size}) and stride > 0, "
                         f"got patch {patch}, stride {stride}")
    if (config.image_size - patch) % stride:
        raise ValueError(f"patch_grid: patches of {patch} px at stride {stride} do not tile a {config.image_size} px "
                         f"image exactly ((image_size - patch) must be a multiple of stride)")
    config.patch_grid = {"patch": patch, "stride": stride}  # resolved, as saved in config.json
    return patch, stride


def batch_norm_to_layer_norm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in ``module`` by GroupNorm(1, C): layer norm over (C, H, W) of each sample
    with BN's per-channel affine, so no statistics are shared between the samples (patches) of a batch."""
    if isinstance(module, nn.BatchNorm2d):
        return nn.GroupNorm(1, module.num_features, eps=module.eps, affine=module.affine)
    for name, child in module.named_children():
        setattr(module, name, batch_norm_to_layer_norm(child))
    return module


def _check_views(config: ModelConfig) -> list[list[int]]:
    """The channel groups of ``config`` (default: all channels in one group), validated."""
    groups = config.view_channels or [list(range(config.channels))]
    if config.colour_space is not None and config.channels != 3:
        raise ValueError(f"colour_space {config.colour_space!r} converts 3-channel RGB input, not {config.channels} channels")
    for group in groups:
        if not group or any(not 0 <= int(c) < config.channels for c in group):
            raise ValueError(f"view_channels {groups}: every group must be a non-empty list of channel indices "
                             f"in [0, {config.channels})")
    return [[int(c) for c in group] for group in groups]


def linear_bn_relu_layers(in_dim: int, hidden_dim: int, layers: int) -> nn.Sequential:
    """``layers`` x (Linear without bias - BN - ReLU): SimCLR v2's projection-head layers (bias is BN's)."""
    if layers < 1:
        raise ValueError(f"a head needs layers >= 1, got {layers}")
    blocks: list[nn.Module] = []
    for _ in range(layers):
        blocks += [nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        in_dim = hidden_dim
    return nn.Sequential(*blocks)


class EmbeddingModel(nn.Module):
    """Image encoder (backbone [+ head] [+ projection]) and optional text encoder sharing one embedding space."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.coca = None
        if config.coca is not None:
            self._build_coca(config)
            return
        patch_grid = _check_patch_grid(config) if config.patch_grid is not None else None
        if config.backbone_norm not in (None, "layer"):
            raise ValueError(f"backbone_norm must be None or 'layer', got {config.backbone_norm!r}")
        if config.colour_space is None and config.view_channels is None:
            input_size = patch_grid[0] if patch_grid else config.image_size  # a patch encoder sees patches
            backbone = build_backbone(config.backbone, input_size, config.channels, config.register_tokens,
                                      config.vit_pool)
            config.mean = list(config.mean or backbone.mean)
            config.std = list(config.std or backbone.std)
            self.backbone = backbone.module
            self.feature_dim = backbone.feature_dim
        else:
            if config.register_tokens or config.vit_pool is not None:
                raise ValueError("register_tokens and vit_pool apply to one ViT backbone, not to split-view encoders")
            groups = _check_views(config)
            if config.mean is None or config.std is None:  # the family's defaults for the RGB input
                defaults = build_backbone(config.backbone, config.image_size, config.channels)
                config.mean = list(config.mean or defaults.mean)
                config.std = list(config.std or defaults.std)
            colour = ColourSpace(config.colour_space, config.mean, config.std) if config.colour_space else None
            self.backbone = ViewSplitEncoder(config.backbone, config.image_size, groups, colour)
            self.feature_dim = self.backbone.feature_dim
        if config.backbone_norm == "layer":
            self.backbone = batch_norm_to_layer_norm(self.backbone)
        if patch_grid is not None:
            self.backbone = PatchGridEncoder(self.backbone, *patch_grid)
        self.config = config
        width = self.feature_dim
        self.image_head = None
        if config.image_head:
            unknown = sorted(set(config.image_head) - {"hidden_dim", "layers"})
            if unknown:
                raise ValueError(f"image_head takes hidden_dim and layers, got unknown {unknown}")
            hidden = int(config.image_head.get("hidden_dim") or self.feature_dim)  # default: the backbone width
            layers = int(config.image_head.get("layers", 1))
            config.image_head = {"hidden_dim": hidden, "layers": layers}  # resolved, as saved in config.json
            self.image_head = linear_bn_relu_layers(self.feature_dim, hidden, layers)
            width = hidden
        self.image_projection = (
            nn.Linear(width, config.image_projection, bias=False)
            if config.image_projection
            else None
        )
        self.embed_dim = config.image_projection or width
        self.text = build_text_tower(config.text, self.embed_dim) if config.text else None

    def _build_coca(self, config: ModelConfig) -> None:
        """The whole model is one ``open_clip.CoCa`` built from ``config.coca``; ``self.text`` is a view of its text
        tower, not a second module, so every parameter has one name (``coca.<open_clip's key>``)."""
        from open_clip import CoCa

        cfg = check_coca_config(config)
        self.coca = CoCa(**cfg)
        init_coca_decoder(self.coca.text_decoder)
        self.backbone = self.image_head = self.image_projection = None
        self.feature_dim = self.embed_dim = int(cfg["embed_dim"])  # the exported feature is the contrastive one
        config.mean = list(config.mean or OPENAI_MEAN)  # open_clip's normalisation, as its own CoCa configs use
        config.std = list(config.std or OPENAI_STD)
        text = cfg["text_cfg"]
        # Resolved from the CoCa's text tower (what the tokenizer, the text export and the model card read).
        config.text = TextConfig(context_length=int(text["context_length"]), vocab_size=int(text["vocab_size"]),
                                 width=int(text["width"]), heads=int(text["heads"]), layers=int(text["layers"]))
        self.config = config
        self.text = CoCaTextView(self.coca)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] normalised images -> [N, embed_dim] (not L2-normalised)."""
        if self.coca is not None:
            return self.coca.encode_image(images, normalize=False)
        features = self.backbone(images)
        if self.image_head is not None:
            features = self.image_head(features)
        return self.image_projection(features) if self.image_projection is not None else features

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, L] int64 tokens -> [N, embed_dim] (not L2-normalised)."""
        if self.text is None:
            raise RuntimeError("this model has no text encoder")
        return self.text(tokens)


class CoCaTextView:
    """``model.text`` of a CoCa model: tokens [N, L] -> the text tower's contrastive embedding [N, embed_dim].

    Deliberately not an ``nn.Module``: the tower's parameters are registered once, under ``coca.text``; a module
    here would list them twice in the state dict (safetensors refuses shared tensors)."""

    def __init__(self, coca: nn.Module):
        self.coca = coca

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.coca.encode_text(tokens, normalize=False)


def init_coca_decoder(decoder: nn.Module) -> None:
    """open_clip's ``MultimodalTransformer`` never runs its ``init_parameters`` (which would fail: it reads
    ``self.transformer``), leaving ``text_projection`` as uninitialised ``torch.empty`` memory; this is that
    method's intended initialisation (CLIP's text-tower scheme) on the decoder's own blocks."""
    width, layers = decoder.width, decoder.layers
    proj_std, attn_std, fc_std = width ** -0.5 * (2 * layers) ** -0.5, width ** -0.5, (2 * width) ** -0.5
    with torch.no_grad():
        for block in [*decoder.resblocks, *decoder.cross_attn]:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(decoder.text_projection, std=width ** -0.5)


COCA_KEYS = ("embed_dim", "vision_cfg", "text_cfg", "multimodal_cfg")


def check_coca_config(config: ModelConfig) -> dict:
    """``config.coca`` validated against the model's image size and channels and the ties open_clip's CoCa needs
    (text width = decoder width = embed_dim: the decoder reads the text tower's tokens and the image tokens)."""
    cfg = dict(config.coca)
    missing = [key for key in COCA_KEYS if key not in cfg]
    unknown = sorted(set(cfg) - set(COCA_KEYS) - {"quick_gelu", "pad_id", "custom_text"})
    if missing or unknown:
        raise ValueError(f"coca config: missing {missing}, unknown {unknown}; it takes open_clip's CoCa model "
                         f"config {list(COCA_KEYS)}")
    cfg.pop("custom_text", None)  # open_clip's JSON flag for its factory, not a CoCa argument
    vision, text, decoder = cfg["vision_cfg"], cfg["text_cfg"], cfg["multimodal_cfg"]
    size = vision.get("image_size", 224)
    if size != config.image_size:
        raise ValueError(f"coca config: vision_cfg.image_size {size} differs from the model's image_size "
                         f"{config.image_size}")
    if config.channels != 3:
        raise ValueError(f"coca takes 3-channel RGB images, not {config.channels} channels")
    if config.colour_space or config.view_channels or config.patch_grid or config.image_head or \
            config.image_projection or config.backbone_norm or config.register_tokens or config.vit_pool:
        raise ValueError("coca's image tower is open_clip's ViT: colour_space, view_channels, patch_grid, image_head, "
                         "image_projection, backbone_norm, register_tokens and vit_pool do not apply")
    widths = {"embed_dim": cfg["embed_dim"], "text_cfg.width": text.get("width", 512),
              "multimodal_cfg.width": decoder.get("width", 512)}
    if len(set(widths.values())) != 1:
        raise ValueError(f"coca config: open_clip's CoCa needs embed_dim = text_cfg.width = multimodal_cfg.width, "
                         f"got {widths}")
    if not (vision.get("attentional_pool") and vision.get("output_tokens") and text.get("embed_cls")
            and text.get("output_tokens")):
        raise ValueError("coca config: vision_cfg needs attentional_pool and output_tokens, text_cfg embed_cls and "
                         "output_tokens (the image tokens and text tokens the decoder reads)")
    if decoder.get("context_length", 77) < text.get("context_length", 77):
        raise ValueError("coca config: multimodal_cfg.context_length must be >= text_cfg.context_length")
    return cfg


def save_model(model: EmbeddingModel, directory: str, card: dict) -> None:
    """Write ``config.json`` and ``model.safetensors`` atomically: a crash leaves the old directory whole."""
    from safetensors.torch import save_file

    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".model-", dir=parent)
    os.chmod(staging, 0o755)  # mkdtemp makes it private; the result is an ordinary directory
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    payload = {
        **card,
        "model": asdict(model.config),
        "embed_dim": model.embed_dim,
        "feature_dim": model.feature_dim,
        "has_text": model.text is not None,
    }
    weights_path = os.path.join(staging, WEIGHTS_NAME)
    # The card travels inside the weights too (safetensors metadata is str -> str), so a copied file still says
    # what it is; "format": "pt" is what transformers-style loaders expect.
    save_file(state, weights_path, metadata={"format": "pt", "model_card": json.dumps(payload, sort_keys=True)})
    make_ordinary_file(weights_path)
    with open(os.path.join(staging, CONFIG_NAME), "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
    replace_directory(staging, directory)


def replace_directory(staging: str, directory: str) -> None:
    """Put the finished ``staging`` directory at ``directory``: the old one is renamed aside first and removed only
    after, so a crash between the two renames leaves the old directory whole."""
    backup = directory + ".old"
    if os.path.exists(directory):
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(directory, backup)
    os.replace(staging, directory)
    shutil.rmtree(backup, ignore_errors=True)


def make_ordinary_file(path: str) -> None:
    """Give ``path`` the mode of an ordinary new file under this process's umask (0644 under 022): safetensors
    writes 0600, and a model is a file to share. Reading the umask means setting it, so it is set straight back."""
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def load_model(directory: str) -> tuple[EmbeddingModel, dict]:
    """Rebuild the model saved in ``directory``; returns (model in eval mode, the saved config.json)."""
    from safetensors.torch import load_file

    config_path = os.path.join(directory, CONFIG_NAME)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"model directory {directory!r} does not exist")
    for path in (config_path, weights_path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"model directory {directory!r} has no {os.path.basename(path)}")
    with open(config_path, encoding="utf-8") as handle:
        saved = json.load(handle)
    model = EmbeddingModel(ModelConfig.from_dict(saved["model"]))
    model.load_state_dict(load_file(weights_path))
    return model.eval(), saved
