"""Multi-crop views that keep their crop geometry (VICRegL: Bardes, Ponce & LeCun 2022): SwAV's 2 global + V local
crops (``trainer.data.multicrop``), each carrying its box and flip like ``trainer.data.crop_geometry``'s two views,
so every cell of every crop's feature map has a known centre in the original image.

Keys: ``global0``, ``global1``, ``local0`` ... (the pixels, in the order ``multicrop.crops_in_order`` reads) and,
for each crop key k, ``box_k`` [4] (x0, y0, x1, y1 in original normalised coordinates) and ``flip_k`` [] (1.0
when mirrored). Every key has a fixed shape, so the data loader stacks them into batches.
"""
from __future__ import annotations

from trainer.data.crop_geometry import CropGeometryViews, PhotometricConfig


class MultiCropGeometryViews:
    """Picklable view recipe ``(PIL image, sample) -> {global0, global1, local0, ..., box_*, flip_*}``.

    Args:
        global_size, local_size: output sides in pixels of the global and local crops.
        mean, std: normalisation of the backbone.
        num_local: V, the number of local crops (0 allowed).
        global_scale, local_scale: the random-resized-crop area ranges of each kind.
        flip: probability of a horizontal flip, per crop.
        colour: the photometric augmentation, the same for every crop.
        num_global: global crops (2 in VICRegL).
    """

    def __init__(self, global_size: int, local_size: int, mean, std, num_local: int, global_scale=(0.4, 1.0),
                 local_scale=(0.08, 0.4), flip: float = 0.5, colour: PhotometricConfig | None = None,
                 num_global: int = 2):
        if num_global < 1 or num_local < 0:
            raise ValueError(f"multi-crop needs >= 1 global and >= 0 local crops, got {num_global} and {num_local}")
        if not 0 < local_size <= global_size:
            raise ValueError(f"local crop size must be in (0, {global_size}], got {local_size}")
        for name, scale in (("global", global_scale), ("local", local_scale)):
            if len(scale) != 2:
                raise ValueError(f"{name} crop scale must be (low, high), got {scale}")
        self.num_global, self.num_local = num_global, num_local
        # One geometry-keeping recipe per crop kind; each call draws that crop's own box and flip.
        self.global_crops = CropGeometryViews(global_size, mean, std, tuple(global_scale), flip=flip, colour=colour)
        self.local_crops = CropGeometryViews(local_size, mean, std, tuple(local_scale), flip=flip, colour=colour)

    def keys(self) -> list[str]:
        """The crop keys, globals first (the pixel tensors; each has ``box_<key>`` and ``flip_<key>`` beside it)."""
        return [f"global{i}" for i in range(self.num_global)] + [f"local{i}" for i in range(self.num_local)]

    def __call__(self, image, sample) -> dict:
        out = {}
        for key in self.keys():
            recipe = self.global_crops if key.startswith("global") else self.local_crops
            crop, flipped = recipe._geometry(image)
            out[key], out[f"box_{key}"], out[f"flip_{key}"] = recipe._view(image, crop, flipped)
        return out
