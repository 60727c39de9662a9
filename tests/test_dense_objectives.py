"""Dense objectives: feature maps of the backbones, crop geometry (exact against an image that encodes its own
coordinates), PixContrast / PixPro / PatchNCE losses against hand-worked values, the pixpro and patchnce
objectives (propagation module, wiring, momentum, checkpoints) and short learning runs on CIFAR-10."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import trainer.objectives.patchnce  # noqa: F401  (registration)
import trainer.objectives.pixpro  # noqa: F401
from trainer.data.crop_geometry import (
    CropGeometryViews, PhotometricConfig, cell_centres, cell_diagonals, cell_distances, positive_pairs,
)
from trainer.losses.dense import patch_nce, pixel_contrast, pixpro_consistency
from trainer.models import build_backbone
from trainer.models.dense import cells, feature_map, feature_maps, probe_shapes, stage_count
from trainer.objectives import ObjectiveSpec, get_objective
from trainer.objectives.momentum import momentum_at

SIZE = 16
SMALL = {"pixpro": {"projection_dim": 16, "projection_hidden_dim": 32},
         "patchnce": {"mlp_dim": 16, "num_patches": 8, "layers": [-2, -1]}}
NO_COLOUR = PhotometricConfig(jitter_prob=0.0, grayscale_prob=0.0)


def _build(key: str, seed: int = 0, **options):
    torch.manual_seed(seed)
    spec = ObjectiveSpec(backbone="cnn-small", image_size=SIZE, options={**SMALL[key], **options})
    return get_objective(key).build(spec)


def _batch(n: int = 4, seed: int = 1, same_boxes: bool = False) -> dict:
    generator = torch.Generator().manual_seed(seed)
    batch = {f"view{i}": torch.randn(n, 3, SIZE, SIZE, generator=generator) for i in range(2)}
    for i in range(2):
        corner = torch.rand(n, 2, generator=generator) * 0.4
        side = 0.5 + torch.rand(n, 1, generator=generator) * 0.1
        batch[f"box{i}"] = torch.cat([corner, corner + side], dim=1)
        batch[f"flip{i}"] = (torch.rand(n, generator=generator) < 0.5).float()
    if same_boxes:
        batch["box1"], batch["flip1"] = batch["box0"].clone(), batch["flip0"].clone()
    return batch


# ---- dense feature maps -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,size,shape", [("cnn-small", 32, (256, 4, 4)), ("resnet18-cifar", 16, (512, 2, 2)),
                                             ("vit-tiny-cifar", 16, (192, 4, 4))])
def test_feature_map_is_the_map_the_backbone_pools(name, size, shape):
    torch.manual_seed(0)
    module = build_backbone(name, size).module.eval()
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        dense = feature_map(module, images)
        pooled = module(images)
    assert tuple(dense.shape) == (2, *shape)
    if name == "vit-tiny-cifar":  # the patch tokens of the final (normed) sequence; the class token is pooled
        tokens = module.forward_features(images)[:, module.num_prefix_tokens:]
        assert torch.allclose(dense.flatten(2).transpose(1, 2), tokens)
    else:
        assert torch.allclose(dense.mean(dim=(2, 3)), pooled, atol=1e-5)


def test_feature_maps_by_stage_and_errors():
    torch.manual_seed(0)
    module = build_backbone("cnn-small", 32).module.eval()
    images = torch.randn(2, 3, 32, 32)
    assert stage_count(module) == 4
    with torch.no_grad():
        first, last = feature_maps(module, images, [0, -1])
        assert tuple(first.shape) == (2, 32, 32, 32) and torch.equal(last, feature_map(module, images))
    assert probe_shapes(module, 32, [1, 2]) == [(64, 16, 16), (128, 8, 8)]
    resnet = build_backbone("resnet18-cifar", 16).module
    assert probe_shapes(resnet, 16, [-4, -1]) == [(64, 16, 16), (512, 2, 2)]
    assert probe_shapes(build_backbone("vit-tiny-cifar", 16).module, 16, [0, 5]) == [(192, 4, 4)] * 2
    with pytest.raises(ValueError, match="out of range"):
        feature_maps(module, images, [4])
    with pytest.raises(ValueError, match="twice"):
        feature_maps(module, images, [3, -1])
    with pytest.raises(ValueError, match="supported"):
        feature_map(torch.nn.Linear(3, 3), images)


# ---- crop geometry ------------------------------------------------------------------------------------------

def test_cell_centres_and_diagonals_hand_worked():
    box = torch.tensor([[0.2, 0.4, 0.6, 1.0]])
    centres = cell_centres(box, torch.zeros(1), 2, 2)[0]
    # x: 0.2 + (0.25, 0.75) * 0.4; y: 0.4 + (0.25, 0.75) * 0.6; cells row-major
    expected = torch.tensor([[0.3, 0.55], [0.5, 0.55], [0.3, 0.85], [0.5, 0.85]])
    assert torch.allclose(centres, expected)
    mirrored = cell_centres(box, torch.ones(1), 2, 2)[0]  # a flipped view's left column shows the box's right side
    assert torch.allclose(mirrored, torch.tensor([[0.5, 0.55], [0.3, 0.55], [0.5, 0.85], [0.3, 0.85]]))
    assert torch.allclose(cell_diagonals(box, 2, 2), torch.tensor([math.sqrt(0.2 ** 2 + 0.3 ** 2)]))


def test_positive_pairs_hand_worked():
    # View a: the whole image, 2x2 cells centred at 0.25/0.75, diagonal sqrt(0.5) = 0.7071.
    # View b: the top-left quarter, centres at 0.125/0.375, diagonal 0.3536. Threshold 0.7 x 0.7071 = 0.495.
    # a0 (.25,.25) is 0.177 from every b cell; a1 (.75,.25) is 0.395 from b1 (.375,.125) and b3 (.375,.375) and
    # 0.637 from b0, b2; a2 likewise with b2, b3; a3 (.75,.75) is 0.530 from b3: no positive.
    box_a, box_b = torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    pairs = positive_pairs(box_a, torch.zeros(1), box_b, torch.zeros(1), (2, 2), (2, 2))[0]
    assert pairs.int().tolist() == [[1, 1, 1, 1], [0, 1, 0, 1], [0, 0, 1, 1], [0, 0, 0, 0]]
    distances = cell_distances(box_a, torch.zeros(1), box_b, torch.zeros(1), (2, 2), (2, 2))[0]
    assert distances[1, 1].item() == pytest.approx(math.hypot(0.375, 0.125) / math.sqrt(0.5), rel=1e-5)
    # b mirrored: its column 0 now shows x = 0.375, so a1's matches become b0 and b2.
    flipped = positive_pairs(box_a, torch.zeros(1), box_b, torch.ones(1), (2, 2), (2, 2))[0]
    assert flipped.int().tolist() == [[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 1, 1], [0, 0, 0, 0]]
    # The same box: neighbours are exactly one cell (0.707 diagonals) apart, so each cell matches only itself.
    same = positive_pairs(box_b, torch.zeros(1), box_b, torch.zeros(1), (4, 4), (4, 4))[0]
    assert torch.equal(same, torch.eye(16, dtype=torch.bool))
    with pytest.raises(ValueError):
        positive_pairs(box_a, torch.zeros(1), box_b, torch.zeros(1), (2, 2), (2, 2), threshold=0.0)


def _coordinate_image(side: int = 128) -> Image.Image:
    """Red = 2 x column index, green = 2 x row index: every pixel says where it came from."""
    y, x = np.mgrid[0:side, 0:side]
    return Image.fromarray(np.stack([2 * x, 2 * y, np.zeros_like(x)], axis=-1).astype(np.uint8))


def _seen_centres(view: torch.Tensor, cells_per_side: int, side: int) -> torch.Tensor:
    """[L, 2]: the mean source pixel (normalised centre coordinates) each cell of a view shows."""
    pixels = view[:2] * 255.0 / 2.0                                                  # source column / row index
    pooled = F.adaptive_avg_pool2d(pixels, cells_per_side).flatten(1).t()           # row-major cells
    return (pooled + 0.5) / side


def test_view_boxes_and_flips_locate_every_cell_exactly():
    side, cells_per_side = 128, 4
    image = _coordinate_image(side)
    recipe = CropGeometryViews(32, [0.0] * 3, [1.0] * 3, crop_scale=(0.2, 1.0), colour=NO_COLOUR)
    torch.manual_seed(0)
    flips, matched = set(), 0
    for _ in range(12):
        out = recipe(image, None)
        assert set(out) == {"view0", "view1", "box0", "box1", "flip0", "flip1"}
        assert out["box0"].shape == (4,) and out["flip0"].shape == () and out["box0"].dtype == torch.float32
        seen = []
        for i in range(2):
            flips.add(out[f"flip{i}"].item())
            centres = cell_centres(out[f"box{i}"][None], out[f"flip{i}"][None], cells_per_side, cells_per_side)[0]
            seen.append(_seen_centres(out[f"view{i}"], cells_per_side, side))
            assert (seen[-1] - centres).abs().max() < 1.5 / side  # within 1.5 source pixels of the geometry
        # Cells paired by geometry show the same part of the image (up to the threshold).
        pairs = positive_pairs(out["box0"][None], out["flip0"][None], out["box1"][None], out["flip1"][None],
                               (cells_per_side,) * 2, (cells_per_side,) * 2)[0]
        diagonal = torch.maximum(cell_diagonals(out["box0"][None], 4, 4), cell_diagonals(out["box1"][None], 4, 4))
        gaps = (seen[0][:, None] - seen[1][None]).norm(dim=-1)[pairs]
        assert (gaps < 0.7 * diagonal + 2.0 / side).all()
        matched += int(pairs.sum())
    assert flips == {0.0, 1.0} and matched > 0


def test_shared_geometry_views_differ_only_in_colour():
    recipe = CropGeometryViews(16, [0.5] * 3, [0.5] * 3, colour=PhotometricConfig(jitter_prob=1.0), shared_geometry=True)
    torch.manual_seed(0)
    out = recipe(_coordinate_image(64), None)
    assert torch.equal(out["box0"], out["box1"]) and torch.equal(out["flip0"], out["flip1"])
    assert not torch.equal(out["view0"], out["view1"])
    with pytest.raises(ValueError):
        CropGeometryViews(16, [0.5] * 3, [0.5] * 3, crop_scale=(0.0, 1.0))


# ---- losses -------------------------------------------------------------------------------------------------

def test_pixel_contrast_hand_worked():
    # Query cells (1,0), (0,1) and (0.6,0.8); key cells (1,0), (0,1), (-1,0) (given at other lengths: cosines).
    query = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [0.6, 0.8]]])
    key = torch.tensor([[[5.0, 0.0], [0.0, 0.5], [-1.0, 0.0]]])
    positives = torch.tensor([[[True, True, False], [False, True, False], [False, False, False]]])
    t = 0.5  # cosines of q0: 1, 0, -1; of q1: 0, 1, 0; q2 has no positive and is left out
    first = -math.log((math.exp(2) + math.exp(0)) / (math.exp(2) + math.exp(0) + math.exp(-2)))
    second = -math.log(math.exp(2) / (math.exp(0) + math.exp(2) + math.exp(0)))
    assert pixel_contrast(query, key, positives, t).item() == pytest.approx((first + second) / 2, rel=1e-5)
    # One cell per image, its own key positive: alone in its image the loss is 0; with the other image's cell
    # (orthogonal, cosine 0) as a negative it is -log(e^2 / (e^2 + e^0)).
    query, key = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]), torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    positives = torch.ones(2, 1, 1, dtype=torch.bool)
    assert pixel_contrast(query, key, positives, t).item() == pytest.approx(0.0, abs=1e-6)
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert pixel_contrast(query, key, positives, t, batch_negatives=True).item() == pytest.approx(expected, rel=1e-5)
    nothing = pixel_contrast(query.requires_grad_(), key, torch.zeros(2, 1, 1, dtype=torch.bool), t)
    nothing.backward()
    assert nothing.item() == 0.0 and torch.equal(query.grad, torch.zeros_like(query))


def test_pixpro_consistency_hand_worked():
    propagated = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[1.0, 0.0], [0.0, 1.0]]])
    target = torch.tensor([[[4.0, 0.0], [3.0, 3.0]], [[-1.0, 0.0], [0.0, 1.0]]])
    # Image 0 pairs (0,0), (0,1), (1,1): cosines 1, 1/sqrt2, 1/sqrt2. Image 1 pair (0,0): cosine -1.
    positives = torch.tensor([[[True, True], [False, True]], [[True, False], [False, False]]])
    image0 = (1 + 2 / math.sqrt(2)) / 3
    assert pixpro_consistency(propagated, target, positives).item() == pytest.approx(-(image0 - 1) / 2, rel=1e-5)
    positives[1] = False  # an image without pairs does not count
    assert pixpro_consistency(propagated, target, positives).item() == pytest.approx(-image0, rel=1e-5)
    assert pixpro_consistency(propagated, target, torch.zeros_like(positives)).item() == 0.0
    with pytest.raises(ValueError):
        pixpro_consistency(propagated, target, positives[:, :1])


def test_patch_nce_hand_worked():
    query = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    key = torch.tensor([[[2.0, 0.0], [0.6, 0.8]]])
    t = 0.5  # row 0 scores (1, 0.6) with target 0; row 1 scores (0, 0.8) with target 1
    row0 = -math.log(math.exp(2) / (math.exp(2) + math.exp(1.2)))
    row1 = -math.log(math.exp(1.6) / (math.exp(0) + math.exp(1.6)))
    assert patch_nce(query, key, t).item() == pytest.approx((row0 + row1) / 2, rel=1e-5)
    # One location per image: no negatives within an image (loss 0); with the batch's, the other image's
    # orthogonal location enters the denominator.
    query, key = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]), torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert patch_nce(query, key, t).item() == pytest.approx(0.0, abs=1e-6)
    assert patch_nce(query, key, t, batch_negatives=True).item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 1)), rel=1e-5)
    with pytest.raises(ValueError):
        patch_nce(query, key[:, :0], t)


# ---- pixpro -------------------------------------------------------------------------------------------------

def test_pixel_propagation_module_matches_a_loop():
    objective = _build("pixpro")
    x = torch.randn(2, 16, 2, 3)
    with torch.no_grad():
        out = objective.propagate(x)
        g = objective.value_transform(x)
        for n in range(2):
            for i in range(6):
                xi = x[n, :, i // 3, i % 3]
                expected = torch.zeros(16)
                for j in range(6):
                    xj, gj = x[n, :, j // 3, j % 3], g[n, :, j // 3, j % 3]
                    expected += max(F.cosine_similarity(xi, xj, dim=0).item(), 0.0) ** 2 * gj / gj.norm()
                assert torch.allclose(out[n, :, i // 3, i % 3], expected, atol=1e-5)


@pytest.mark.parametrize("mode", ["pixpro", "pixcontrast"])
def test_pixpro_loss_pairs_cells_by_the_batch_geometry(mode):
    objective = _build("pixpro", mode=mode)
    batch = _batch(same_boxes=True)
    outputs = objective(batch)
    # Identical boxes: each cell's only positive is itself, mirrored where the view was flipped.
    assert outputs["positive_pairs"].item() == 4.0 and outputs["images_with_pairs"].item() == 1.0
    with torch.no_grad():
        online = [objective.projector(feature_map(objective.encoder.backbone, batch[v])) for v in ("view0", "view1")]
        target = [objective.key_projector(feature_map(objective.key_encoder.backbone, batch[v])) for v in ("view0", "view1")]
    queries = [cells(objective.propagate(o) if mode == "pixpro" else o) for o in online]
    keys = [cells(t_) for t_ in target]
    eye = torch.eye(4, dtype=torch.bool).expand(4, 4, 4)
    if mode == "pixpro":
        expected = -(F.cosine_similarity(queries[0], keys[1], dim=-1).mean() + F.cosine_similarity(queries[1], keys[0], dim=-1).mean())
    else:
        expected = pixel_contrast(queries[0], keys[1], eye, 0.3) + pixel_contrast(queries[1], keys[0], eye, 0.3)
    assert torch.allclose(outputs["loss"], expected, rtol=1e-4, atol=1e-6)
    assert 0.0 < outputs["embedding_std"].item() <= 1.5
    if mode == "pixpro":  # view 1 mirrored instead: cell (r, c) pairs with (r, 1 - c) of the 2x2 map
        batch["flip1"] = 1.0 - batch["flip0"]
        mirror = [1, 0, 3, 2]
        expected = -(F.cosine_similarity(queries[0], keys[1][:, mirror], dim=-1).mean()
                     + F.cosine_similarity(queries[1], keys[0][:, mirror], dim=-1).mean())
        assert torch.allclose(objective(batch)["loss"], expected, rtol=1e-4, atol=1e-6)
    outputs["loss"].backward()
    assert objective.projector[0].weight.grad is not None and objective.key_projector[0].weight.grad is None


def test_pixpro_momentum_schedule_instance_branch_and_option_errors():
    objective = _build("pixpro", instance_weight=1.0)
    outputs = objective(_batch())
    assert torch.allclose(outputs["loss"], outputs["pixel_loss"] + outputs["instance_loss"])
    before = objective.key_instance_projector[0].weight.clone()
    with torch.no_grad():
        objective.instance_projector[0].weight.add_(1.0)
    objective.after_step(4, 10)
    m = momentum_at(5, 10, 0.99)
    assert torch.allclose(objective.key_instance_projector[0].weight,
                          m * before + (1 - m) * objective.instance_projector[0].weight)
    for bad in ({"mode": "pixel"}, {"transform_layers": 3}, {"gamma": 0.0}, {"augment": {"solarize": 0.2}}):
        with pytest.raises(ValueError):
            _build("pixpro", **bad)
    with pytest.raises(ValueError, match="unknown option"):
        _build("pixpro", queue_size=3)


@pytest.mark.parametrize("key", ["pixpro", "patchnce"])
def test_state_survives_state_dict_save_and_load(key, tmp_path):
    objective = _build(key, **({"instance_weight": 0.5} if key == "pixpro" else {}))
    for step in range(2):
        objective(_batch(seed=step))["loss"].backward()
        with torch.no_grad():
            for p in objective.encoder.parameters():
                p.add_(0.01 * torch.randn_like(p))
        objective.after_step(step, 10)
    torch.save(objective.state_dict(), tmp_path / "state.pt")
    restored = _build(key, seed=7, **({"instance_weight": 0.5} if key == "pixpro" else {}))
    restored.load_state_dict(torch.load(tmp_path / "state.pt"))
    state, loaded = objective.state_dict(), restored.state_dict()
    assert all(torch.equal(state[n], loaded[n]) for n in state)
    if key == "pixpro":
        assert any(n.startswith("key_encoder") for n in state) and any(n.startswith("key_instance") for n in state)
    objective.eval(), restored.eval()
    batch = _batch(seed=5)
    torch.manual_seed(3)  # patchnce samples locations
    first = objective(batch)["loss"]
    torch.manual_seed(3)
    assert torch.allclose(first, restored(batch)["loss"])


# ---- patchnce -----------------------------------------------------------------------------------------------

def test_patchnce_loss_contrasts_the_same_sampled_locations_per_layer():
    objective = _build("patchnce")
    assert objective.stages == [2, 3]
    batch = _batch()
    torch.manual_seed(11)
    outputs = objective(batch)
    torch.manual_seed(11)  # the same location draws: 8 of 8x8 at stage 2, all 4 of 2x2 at stage 3
    with torch.no_grad():
        maps = [feature_maps(objective.encoder.backbone, batch[v], [2, 3]) for v in ("view0", "view1")]
        expected = []
        for index, head in enumerate(objective.heads):
            ids = torch.randperm(cells(maps[0][index]).shape[1])[:8]
            assert len(ids) == (8 if index == 0 else 4)
            q = [head(cells(m[index])[:, ids]) for m in maps]
            expected.append((patch_nce(q[0], q[1], 0.07) + patch_nce(q[1], q[0], 0.07)) / 2)
    assert torch.allclose(outputs["loss"], torch.stack(expected).mean(), rtol=1e-4)
    assert torch.allclose(outputs["loss_stage2"], expected[0], rtol=1e-4)
    views = objective.views()
    torch.manual_seed(0)
    sample = views(_coordinate_image(48), None)
    assert torch.equal(sample["box0"], sample["box1"]) and sample["view0"].shape == (3, SIZE, SIZE)
    with pytest.raises(ValueError, match="out of range"):
        _build("patchnce", layers=[7])
    with pytest.raises(ValueError):
        _build("patchnce", layers=[])
