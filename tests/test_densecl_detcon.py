"""DenseCL, DetCon_S / DetCon_B and PaKA: the dense correspondence, DenseCL's dense loss, mask pooling, the
contrastive detection loss, CKA and the overlap resampling against hand-worked values; segmentation masks that
follow each view's crop and flip; the objectives' wiring, state, option errors, and DetCon_S on two processes
against one."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from distributed_helpers import assert_two_processes_match_one
from PIL import Image

import trainer.objectives.densecl  # noqa: F401  (registration; detcon and paka are imported below)
from trainer.data.crop_geometry import (
    CropGeometryViews,
    PhotometricConfig,
    crop_geometry_views,
)
from trainer.data.pipeline import collate
from trainer.data.segmentation_masks import (
    Segmentation,
    SegmentationMaskViews,
    sample_mask_ids,
)
from trainer.losses.densecl import dense_correspondence, densecl_loss
from trainer.losses.detcon import detcon_loss, detcon_regression
from trainer.losses.paka import patch_kernel_alignment
from trainer.models.dense import cells, feature_map
from trainer.objectives import ObjectiveSpec, get_objective
from trainer.objectives.detcon import mask_pool
from trainer.objectives.momentum import momentum_at
from trainer.objectives.paka import PlainTeacherViews, overlap_rois, roi_tokens

SIZE = 16
SMALL = {
    "densecl": {"queue_size": 32, "projection_dim": 8, "projection_hidden_dim": 16, "bn_splits": 2},
    "detcon_s": {"num_masks": 3, "projection_dim": 8, "projection_hidden_dim": 16, "fh_scale": 100.0,
                 "fh_min_size": 10},
    "detcon_b": {"num_masks": 3, "projection_dim": 8, "projection_hidden_dim": 16, "predictor_hidden_dim": 16,
                 "fh_scale": 100.0, "fh_min_size": 10},
    "paka": {"grid_size": 2},
}


def _build(key: str, seed: int = 0, **options):
    torch.manual_seed(seed)
    return get_objective(key).build(ObjectiveSpec(backbone="cnn-small", image_size=SIZE,
                                                  options={**SMALL[key], **options}))


def _angle(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


# ---- DenseCL losses -----------------------------------------------------------------------------------------

def test_dense_correspondence_on_a_hand_built_2x2_map():
    # Query cells at 0, 90, 180, 270 degrees (row-major in a 2x2 map); key cells at 80, 175, 5, 260 degrees with
    # different norms: the nearest angles are key 2, 0, 1, 3.
    query_map = torch.tensor(_angle(0) + _angle(90) + _angle(180) + _angle(270)).view(2, 2, 2).permute(2, 0, 1)
    keys = [2.0 * torch.tensor(_angle(80)), 0.5 * torch.tensor(_angle(175)), 3.0 * torch.tensor(_angle(5)),
            torch.tensor(_angle(260))]
    key_map = torch.stack(keys).view(2, 2, 2).permute(2, 0, 1)
    matches = dense_correspondence(cells(query_map[None]), cells(key_map[None]))
    assert matches.tolist() == [[2, 0, 1, 3]]
    # The argmax is of the cosine, not the dot product: key 2's length 3 does not pull query 1 (90 deg) to it.
    assert dense_correspondence(cells(query_map[None]), cells(key_map[None]).flip(1)).tolist() == [[1, 3, 2, 0]]


def test_densecl_loss_hand_worked():
    # One image, two query cells at 0 and 90 deg matched to key cells 1 (at 30 deg) and 0 (at 90 deg); two queue
    # negatives at 180 and 45 deg; tau 0.5.
    query = torch.tensor([[_angle(0), _angle(90)]]) * torch.tensor([[[2.0], [0.3]]])  # norms do not matter
    key = torch.tensor([[_angle(90), _angle(30)]])
    negatives = torch.tensor([_angle(180), _angle(45)])
    matches = torch.tensor([[1, 0]])
    cos = lambda a, b: math.cos(math.radians(a - b))
    tau = 0.5

    def term(q: float, positive: float) -> float:
        scores = [cos(q, positive)] + [cos(q, n) for n in (180, 45)]
        return -math.log(math.exp(scores[0] / tau) / sum(math.exp(s / tau) for s in scores))

    expected = (term(0, 30) + term(90, 90)) / 2
    assert densecl_loss(query, key, matches, negatives, tau).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="matches"):
        densecl_loss(query, key, matches[:, :1], negatives, tau)


# ---- DetCon: mask pooling and losses ------------------------------------------------------------------------

def test_mask_pool_of_a_2x2_map_with_two_masks():
    features = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[10.0, 20.0], [30.0, 40.0]]])[None]  # [1, 2, 2, 2]
    masks = torch.tensor([[[0, 0], [1, 0]]])  # mask 0: cells (0,0), (0,1), (1,1); mask 1: cell (1,0)
    pooled = mask_pool(features, masks, torch.tensor([[0, 1, 7]]))
    expected = torch.tensor([[[7 / 3, 70 / 3], [3.0, 30.0], [0.0, 0.0]]])  # id 7 is absent: zeros
    assert torch.allclose(pooled, expected)
    # Pixel-resolution masks (4x4 on the 2x2 map): each cell weighted by the mask's share of its 4 pixels.
    # Mask 1 covers 1 pixel of cell (0,0) and all 4 of cell (1,1): (0.25 * f00 + 1.0 * f11) / 1.25.
    fine = torch.zeros(1, 4, 4, dtype=torch.long)
    fine[0, 0, 0] = 1
    fine[0, 2:, 2:] = 1
    pooled = mask_pool(features, fine, torch.tensor([[1, 0]]))
    assert torch.allclose(pooled[0, 0], (0.25 * features[0, :, 0, 0] + features[0, :, 1, 1]) / 1.25)
    rest = (0.75 * features[0, :, 0, 0] + features[0, :, 0, 1] + features[0, :, 1, 0]) / 2.75
    assert torch.allclose(pooled[0, 1], rest)


def test_detcon_loss_2_images_x_2_masks_hand_worked():
    # Views identical, the four masks at 0, 90, 180, 270 deg, tau 0.5. Query at 0 deg: positive cos 1; the other
    # view's other keys cos 0, -1, 0; its own view's keys except itself cos 0, -1, 0. Every query alike, so
    # each direction is log(1 + 4 e^-2 + 2 e^-4) and the loss twice that.
    z = torch.tensor([[_angle(0), _angle(90)], [_angle(180), _angle(270)]])
    ids = torch.tensor([[3, 5], [3, 5]])  # the same ids in both images: other images' masks are still negatives
    expected = 2 * math.log(1 + 4 * math.exp(-2) + 2 * math.exp(-4))
    assert detcon_loss(z, z, z, z, ids, ids, 0.5).item() == pytest.approx(expected, rel=1e-6)


def test_detcon_loss_at_general_angles_and_separate_keys():
    # Queries and keys apart (DetCon_B): the loss written out term by term.
    queries = [[[10, 100], [200, 300]], [[40, 130], [170, 250]]]    # [view][image][slot] angles
    keys = [[[0, 95], [190, 280]], [[20, 120], [210, 260]]]
    ids = [[1, 2], [1, 2]]
    tau = 0.3
    cos = lambda a, b: math.cos(math.radians(a - b))

    def direction(v: int) -> float:
        total = 0.0
        for n in range(2):
            for i in range(2):
                q = queries[v][n][i]
                positive = cos(q, keys[1 - v][n][i])
                others = [cos(q, keys[1 - v][m][j]) for m in range(2) for j in range(2)]
                own = [cos(q, keys[v][m][j]) for m in range(2) for j in range(2) if (m, j) != (n, i)]
                total -= positive / tau - math.log(sum(math.exp(s / tau) for s in others + own))
        return total / 4

    as_tensor = lambda angles: torch.tensor([[_angle(a) for a in image] for image in angles])
    got = detcon_loss(as_tensor(queries[0]), as_tensor(queries[1]), as_tensor(keys[0]), as_tensor(keys[1]),
                      torch.tensor(ids), torch.tensor(ids), tau)
    assert got.item() == pytest.approx(direction(0) + direction(1), rel=1e-6)


def test_detcon_repeated_ids_count_once_and_slots_without_positive_count_zero():
    # One image whose two slots both hold region 0: each query has 2 equal positives and no other key (its own
    # view's region-0 keys are excluded), so its cross-entropy is log 2; weighted 1/2 (the id repeats twice),
    # the mean over the 2 slots is log 2 / 2 per direction, log 2 for both.
    u = torch.tensor([[_angle(0), _angle(0)]])
    v = torch.tensor([[_angle(40), _angle(40)]])
    ids = torch.tensor([[0, 0]])
    assert detcon_loss(u, v, u, v, ids, ids, 0.1).item() == pytest.approx(math.log(2), rel=1e-6)
    # No slot of view 0 shares an id with view 1: no positives, the loss is 0 (and keeps a graph).
    u.requires_grad_(True)
    loss = detcon_loss(u, v, u, v, ids, torch.tensor([[1, 1]]), 0.1)
    loss.backward()
    assert loss.item() == 0.0 and u.grad is not None


def test_detcon_regression_hand_worked():
    # One image, masks 0 and 1; predictions at 0 / 90 (view 0) and 30 / 180 (view 1); targets at 60 / 90 (view
    # 0) and 0 / 90 (view 1). Each slot: 2 - 2 cos to the other view's target of its id.
    angles = {"p0": (0, 90), "p1": (30, 180), "t0": (60, 90), "t1": (0, 90)}
    tensors = {k: torch.tensor([[_angle(a) for a in v]]) for k, v in angles.items()}
    ids = torch.tensor([[0, 1]])
    one = lambda a, b: 2 - 2 * math.cos(math.radians(a - b))
    expected = (one(0, 0) + one(90, 90)) / 2 + (one(30, 60) + one(180, 90)) / 2
    got = detcon_regression(tensors["p0"], tensors["p1"], tensors["t0"], tensors["t1"], ids, ids)
    assert got.item() == pytest.approx(expected, rel=1e-6)


# ---- PaKA ---------------------------------------------------------------------------------------------------

def test_cka_of_identical_scaled_and_orthogonal_kernels():
    z = torch.tensor([[[1.0, 0.5], [-1.0, 2.0], [1.0, -1.0], [0.0, 3.0]]])
    rotation = torch.tensor([[0.6, -0.8], [0.8, 0.6]])
    assert patch_kernel_alignment(z, z).item() == pytest.approx(0.0, abs=1e-6)
    assert patch_kernel_alignment(z, 3.0 * z @ rotation + 5.0).item() == pytest.approx(0.0, abs=1e-6)
    # 1-d tokens whose centred values are orthogonal: <H K_s H, H K_t H> = (z_s . z_t)^2 = 0, CKA 0.
    s = torch.tensor([[[1.0], [-1.0], [1.0], [-1.0]]])
    t = torch.tensor([[[1.0], [1.0], [-1.0], [-1.0]]])
    assert patch_kernel_alignment(s, t).item() == pytest.approx(1.0, abs=1e-6)
    # (z_s . z_t)^2 / (|z_s|^2 |z_t|^2) = 4^2 / (4 * 12) = 1/3 for t = (1, 1, 1, -3) (mean 0).
    t = torch.tensor([[[1.0], [1.0], [1.0], [-3.0]]])
    assert patch_kernel_alignment(s, t).item() == pytest.approx(2 / 3, rel=1e-6)


def test_cka_mask_and_gradient():
    s = torch.tensor([[[1.0], [-1.0], [1.0], [-1.0]], [[1.0], [2.0], [3.0], [4.0]]], requires_grad=True)
    t = torch.tensor([[[1.0], [1.0], [-1.0], [-1.0]], [[2.0], [4.0], [6.0], [0.0]]], requires_grad=True)
    # Image 0 keeps tokens 0 and 1 (centred: (1, -1) vs (0, 0): CKA 0); image 1 drops its last token
    # (identical up to scale: CKA 1). Mean loss (1 + 0) / 2.
    mask = torch.tensor([[False, False, True, True], [False, False, False, True]])
    loss = patch_kernel_alignment(s, t, mask)
    assert loss.item() == pytest.approx(0.5, abs=1e-6)
    loss.backward()
    assert s.grad is not None and t.grad is None  # the teacher is detached
    # Images with fewer than two valid tokens are left out; none left: 0.
    only_one = torch.tensor([[False, True, True, True], [True, True, True, True]])
    assert patch_kernel_alignment(s, t, only_one).item() == 0.0
    assert patch_kernel_alignment(s, t, only_one[[1, 0]]).item() == 0.0


def test_overlap_rois_hand_worked():
    box_a = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.6, 1.0]])
    box_b = torch.tensor([[0.5, 0.25, 1.0, 0.75], [0.6, 0.6, 1.0, 1.0], [0.4, 0.0, 1.0, 0.6]])
    roi_a, roi_b, overlaps = overlap_rois(box_a, box_b)
    assert overlaps.tolist() == [True, False, True]
    # Image 0: b inside a. Image 2: intersection x 0.4-0.6, y 0.2-0.6 -> in a (0.5, 0, 1, 0.5), in b (0, 1/3, 1/3, 1).
    assert torch.allclose(roi_a[0], torch.tensor([0.5, 0.25, 1.0, 0.75]))
    assert torch.allclose(roi_b[0], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert torch.allclose(roi_a[2], torch.tensor([0.5, 0.0, 1.0, 0.5]))
    assert torch.allclose(roi_b[2], torch.tensor([0.0, 1 / 3, 1 / 3, 1.0]))
    assert torch.equal(roi_a[1], torch.tensor([0.0, 0.0, 1.0, 1.0]))  # no overlap: the whole view, flagged


def test_roi_tokens_put_both_views_on_one_grid_through_flips():
    # Feature maps whose channels are the original-image (x, y) of each cell centre: after resampling the
    # overlap, both views' tokens must carry the same coordinates, whether a view was mirrored or not.
    def coordinate_map(box, flipped, side=4):
        u = (torch.arange(side) + 0.5) / side
        x = box[0] + (1 - u if flipped else u) * (box[2] - box[0])
        y = box[1] + u * (box[3] - box[1])
        return torch.stack([x[None, :].expand(side, side), y[:, None].expand(side, side)])

    box_a, box_b = torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.tensor([0.25, 0.25, 0.75, 0.75])
    for flip_a, flip_b in [(False, False), (True, False), (False, True), (True, True)]:
        maps = [coordinate_map(box_a, flip_a)[None], coordinate_map(box_b, flip_b)[None]]
        roi_a, roi_b, _ = overlap_rois(box_a[None], box_b[None])
        a = roi_tokens(maps[0], torch.tensor([float(flip_a)]), roi_a, 2)
        b = roi_tokens(maps[1], torch.tensor([float(flip_b)]), roi_b, 2)
        expected = torch.tensor([[0.375, 0.375], [0.625, 0.375], [0.375, 0.625], [0.625, 0.625]])
        assert torch.allclose(a[0], expected, atol=1e-6) and torch.allclose(b[0], expected, atol=1e-6)


# ---- segmentation masks carried with the crops --------------------------------------------------------------

PALETTE = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]


def _quadrants(side: int = 32) -> np.ndarray:
    image = np.zeros((side, side, 3), np.uint8)
    half = side // 2
    for colour, (y, x) in zip(PALETTE, [(0, 0), (0, half), (half, 0), (half, half)]):
        image[y:y + half, x:x + half] = colour
    return image


def test_felzenszwalb_and_slic_find_the_four_quadrants():
    image = _quadrants()
    for segmentation in (Segmentation(scale=100.0, sigma=0.0, min_size=30),
                         Segmentation("slic", segments=4, compactness=10.0)):
        labels = segmentation(Image.fromarray(image))
        assert labels.shape == (32, 32) and sorted(np.unique(labels).tolist()) == [0, 1, 2, 3]
        quadrant = np.array([[0] * 16 + [1] * 16] * 16 + [[2] * 16 + [3] * 16] * 16)
        assert all(len(np.unique(labels[quadrant == q])) == 1 for q in range(4))
    with pytest.raises(ValueError, match="segmentation must be one of"):
        Segmentation("watershed")


def test_the_mask_follows_each_views_crop_and_flip():
    """Colour off, so a view pixel that is exactly a palette colour lies inside that quadrant: its mask id must
    be the id the whole-image segmentation gave that quadrant, in both views, mirrored or not."""
    image = Image.fromarray(_quadrants())
    segmentation = Segmentation(scale=100.0, sigma=0.0, min_size=30)
    labels = segmentation(image)
    id_of_colour = {colour: labels[y, x] for colour, (y, x) in zip(PALETTE, [(4, 4), (4, 28), (28, 4), (28, 28)])}
    no_colour = PhotometricConfig(jitter_prob=0.0, grayscale_prob=0.0)
    views = SegmentationMaskViews(24, [0.0] * 3, [1.0] * 3, segmentation, num_masks=3, crop_scale=(0.3, 1.0),
                                  colour=no_colour)
    palette = torch.tensor(PALETTE, dtype=torch.float32) / 255
    seen_flips, seen_regions = set(), 0
    for seed in range(12):
        torch.manual_seed(seed)
        out = views(image, None)
        for index in (0, 1):
            pixels = out[f"view{index}"].permute(1, 2, 0).reshape(-1, 1, 3)              # [P, 1, 3]
            exact = ((pixels - palette[None]).abs().max(dim=2).values < 1e-3)             # [P, 4]
            pure = exact.any(dim=1)
            expected = torch.tensor([id_of_colour[PALETTE[c]] for c in exact[pure].int().argmax(dim=1).tolist()])
            assert torch.equal(out[f"mask{index}"].reshape(-1)[pure], expected), f"seed {seed}, view {index}"
            seen_flips.add(bool(out[f"flip{index}"]))
            seen_regions = max(seen_regions, len(out[f"mask{index}"].unique()))
        present = [set(out[f"mask{i}"].unique().tolist()) for i in (0, 1)]
        assert set(out["mask_ids"].tolist()) <= present[0] & present[1]
        assert out["mask0"].dtype == torch.int64 and out["mask_ids"].shape == (3,)
    assert seen_flips == {False, True} and seen_regions >= 3  # mirrored views and crops over several regions


def test_sampled_ids_are_in_both_views_even_for_small_disjoint_crops():
    # A 4x4 chequer of 16 regions and crops of 2-4% of the image: crops often share no region; after one
    # attempt the second view reuses the first crop, so every id is still present in both views.
    image = np.zeros((32, 32, 3), np.uint8)
    for r in range(4):
        for c in range(4):
            image[8 * r:8 * r + 8, 8 * c:8 * c + 8] = (16 * (4 * r + c), 255 - 16 * (4 * r + c), 80 * (c % 2))
    views = SegmentationMaskViews(8, [0.0] * 3, [1.0] * 3, Segmentation(scale=50.0, sigma=0.0, min_size=4),
                                  num_masks=2, crop_scale=(0.02, 0.04), attempts=1)
    torch.manual_seed(0)
    for _ in range(20):
        out = views(Image.fromarray(image), None)
        for index in (0, 1):
            assert torch.isin(out["mask_ids"], out[f"mask{index}"].unique()).all()


def test_sample_mask_ids_without_then_with_repeats():
    torch.manual_seed(0)
    ids = sample_mask_ids(torch.tensor([4, 7, 9, 12]), 3)
    assert len(set(ids.tolist())) == 3 and set(ids.tolist()) <= {4, 7, 9, 12}
    ids = sample_mask_ids(torch.tensor([4, 7]), 5)
    assert ids.shape == (5,) and set(ids.tolist()) == {4, 7}


# ---- objectives ---------------------------------------------------------------------------------------------

def _dense_batch(n: int = 4, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {f"view{i}": torch.randn(n, 3, SIZE, SIZE, generator=generator) for i in range(2)}


def test_densecl_wiring_queues_and_state():
    objective = _build("densecl", shuffle_bn=False, dense_weight=1.0)
    batch = _dense_batch()
    outputs = objective(batch)
    # The dense term from its parts: matches from the BACKBONE cells, the loss on the dense projections.
    with torch.no_grad():
        query_map = feature_map(objective.encoder.backbone, batch["view0"])
        key_map = feature_map(objective.key_encoder.backbone, batch["view1"])
        dense_query = cells(objective.dense_projector(query_map))
        dense_key = cells(objective.key_dense_projector(key_map))
        matches = dense_correspondence(cells(query_map), cells(key_map))
        expected = densecl_loss(dense_query, dense_key, matches, objective.dense_queue, 0.2)
    assert not torch.equal(matches, dense_correspondence(dense_query, dense_key))  # the choice matters here
    assert outputs["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert outputs["dense_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    outputs["loss"].backward()
    assert objective.dense_projector[0].weight.grad is not None
    assert all(p.grad is None for p in objective.key_dense_projector.parameters())
    # After the step: the pooled dense keys fill the dense queue's first rows, and the key head moves by EMA.
    pending = objective._pending_dense_keys.clone()
    with torch.no_grad():
        for p in objective.dense_projector.parameters():
            p.add_(1.0)
    before = objective.key_dense_projector[0].weight.clone()
    objective.after_step(0, 10)
    assert objective.dense_queue_ptr.item() == 4 and objective.queue_ptr.item() == 4
    assert torch.allclose(objective.dense_queue[:4], pending)
    assert torch.allclose(pending.norm(dim=1), torch.ones(4))
    online = objective.dense_projector[0].weight
    m = objective.options.momentum
    assert torch.allclose(objective.key_dense_projector[0].weight, m * before + (1 - m) * online, atol=1e-6)
    # Queues and pointers are buffers: a checkpoint restores them.
    state = objective.state_dict()
    restored = _build("densecl", seed=5, shuffle_bn=False, dense_weight=1.0)
    restored.load_state_dict(state)
    assert torch.equal(restored.dense_queue, objective.dense_queue) and restored.dense_queue_ptr.item() == 4


def test_densecl_total_is_the_lambda_mix_with_shuffled_bn():
    objective = _build("densecl")  # shuffling BN in 2 groups, lambda 0.5
    outputs = objective(_dense_batch())
    mixed = 0.5 * outputs["global_loss"] + 0.5 * outputs["dense_loss"]
    assert torch.isfinite(outputs["loss"]) and outputs["loss"].item() == pytest.approx(mixed.item(), rel=1e-6)
    outputs["loss"].backward()
    assert all(p.grad is not None for p in objective.encoder.parameters())


def _mask_batch(n: int = 8, seed: int = 1, masks: int = 3) -> dict:
    """Views plus masks of 4 quadrant regions with ids drawn from 0..5, and ``masks`` ids present in both."""
    generator = torch.Generator().manual_seed(seed)
    batch = {f"view{i}": torch.randn(n, 3, SIZE, SIZE, generator=generator) for i in range(2)}
    half = SIZE // 2
    region_ids = torch.stack([torch.randperm(6, generator=generator)[:4] for _ in range(n)])   # [n, 4]
    for i in range(2):
        mask = torch.empty(n, SIZE, SIZE, dtype=torch.long)
        order = region_ids if i == 0 else region_ids[:, [1, 0, 3, 2]]  # view 1: a mirrored layout
        for q, (y, x) in enumerate([(0, 0), (0, half), (half, 0), (half, half)]):
            mask[:, y:y + half, x:x + half] = order[:, q, None, None]
        batch[f"mask{i}"] = mask
    batch["mask_ids"] = region_ids[:, :masks]
    return batch


def _build_detcon_s():  # module level: the two-process helper pickles it
    return _build("detcon_s")


def _global_mask_batch():
    return _mask_batch()


def test_detcon_s_two_processes_equal_one_process(tmp_path):
    """Both views' mask vectors are gathered with their gradient: negatives come from the other process's
    images, and the loss and gradients equal one process holding the whole batch."""
    # Losses agree at rtol 1e-5 (the helper's loss check). Gradients reach ~8 here and float32 sums in another
    # order differ by up to ~2e-5 (3e-6 of the largest), so the gradient check uses atol 1e-4.
    assert_two_processes_match_one(_build_detcon_s, _global_mask_batch, tmp_path, atol=1e-4)


def test_detcon_s_and_b_forward_backward_and_state():
    batch = _mask_batch()
    for key in ("detcon_s", "detcon_b"):
        objective = _build(key)
        outputs = objective(batch)
        assert torch.isfinite(outputs["loss"]) and outputs["masks_per_image"].item() == 3.0
        outputs["loss"].backward()
        assert all(p.grad is not None for p in objective.encoder.parameters())
    assert all(p.grad is None for p in objective.target_encoder.parameters())
    # DetCon_B: the target network follows by EMA after each step, and is in the checkpoint.
    with torch.no_grad():
        for p in objective.encoder.parameters():
            p.add_(1.0)
    before = next(objective.target_encoder.parameters()).clone()
    objective.after_step(0, 100)
    assert not torch.equal(next(objective.target_encoder.parameters()), before)
    restored = _build("detcon_b", seed=3)
    restored.load_state_dict(objective.state_dict())
    assert torch.equal(next(restored.target_encoder.parameters()), next(objective.target_encoder.parameters()))
    regression = _build("detcon_b", loss="regression")(batch)["loss"]
    assert torch.isfinite(regression) and 0.0 <= regression.item() <= 8.0


def test_detcon_views_feed_the_objective():
    objective = _build("detcon_s")
    views = objective.views()
    images = [Image.fromarray(_quadrants(SIZE)) for _ in range(4)]
    batch = collate([views(image, None) for image in images])
    assert batch["mask0"].shape == (4, SIZE, SIZE) and batch["mask_ids"].shape == (4, 3)
    assert torch.isfinite(objective(batch)["loss"])


def _paka_batch(n: int = 4, same: bool = False) -> dict:
    generator = torch.Generator().manual_seed(2)
    batch = {"view0": torch.randn(n, 3, SIZE, SIZE, generator=generator)}
    corner = torch.rand(n, 2, generator=generator) * 0.3
    batch["box0"] = torch.cat([corner, corner + 0.6], dim=1)
    batch["flip0"] = (torch.rand(n, generator=generator) < 0.5).float()
    if same:
        batch.update(view1=batch["view0"].clone(), box1=batch["box0"].clone(), flip1=batch["flip0"].clone())
    else:
        batch.update(view1=torch.randn(n, 3, SIZE, SIZE, generator=generator), box1=batch["box0"] + 0.1,
                     flip1=1.0 - batch["flip0"])
    return batch


def test_paka_wiring_teacher_and_views():
    objective = _build("paka")
    # At the start the teacher equals the student: the same view on both sides aligns perfectly.
    assert objective(_paka_batch(same=True))["loss"].item() == pytest.approx(0.0, abs=1e-5)
    batch = _paka_batch()
    batch["box1"][0] = torch.tensor([0.95, 0.95, 1.0, 1.0])  # image 0: crops that do not meet
    batch["box0"][0] = torch.tensor([0.0, 0.0, 0.5, 0.5])
    outputs = objective(batch)
    assert outputs["loss"].item() > 0.0 and outputs["overlapping_views"].item() == 0.75
    outputs["loss"].backward()
    assert all(p.grad is not None for p in objective.encoder.parameters())
    assert all(p.grad is None for p in objective.teacher.parameters())
    with torch.no_grad():
        for p in objective.encoder.parameters():
            p.add_(1.0)
    before = next(objective.teacher.parameters()).clone()
    objective.after_step(0, 100)
    m = momentum_at(1, 100, 0.99, 1.0)
    online = next(objective.encoder.parameters())
    assert torch.allclose(next(objective.teacher.parameters()), m * before + (1 - m) * online, atol=1e-6)
    # The augmentation-free teacher: with grayscale always on, only the student's view turns grey.
    assert isinstance(objective.views(), PlainTeacherViews)
    assert isinstance(_build("paka", teacher_augment=True).views(), CropGeometryViews)
    student = crop_geometry_views(SIZE, [0.0] * 3, [1.0] * 3, {"grayscale_prob": 1.0, "jitter_prob": 0.0})
    torch.manual_seed(0)
    out = PlainTeacherViews(student, [0.0] * 3, [1.0] * 3)(Image.fromarray(_quadrants()), None)
    assert torch.allclose(out["view0"][0], out["view0"][1]) and not torch.allclose(out["view1"][0], out["view1"][1])
    assert set(out) == {"view0", "view1", "box0", "box1", "flip0", "flip1"}


@pytest.mark.parametrize("key,options,match", [
    ("densecl", {"dense_weight": 1.5}, "dense_weight"),
    ("detcon_s", {"segmentation": "watershed"}, "segmentation must be one of"),
    ("detcon_s", {"num_masks": 0}, "num_masks"),
    ("detcon_s", {"fh_scale": "big"}, "fh_scale must be a number"),
    ("detcon_s", {"augment": {"solarize_prob": 0.2}}, "unknown key"),
    ("detcon_b", {"loss": "mse"}, "loss must be one of"),
    ("detcon_b", {"momentum": 1.5}, "momentum"),
    ("paka", {"grid_size": 1}, "grid_size"),
    ("paka", {"augment": {"hue": 0.1}}, "unknown key"),
])
def test_option_errors_are_clear(key, options, match):
    with pytest.raises(ValueError, match=match):
        get_objective(key).build(ObjectiveSpec(backbone="cnn-small", image_size=SIZE, options=options))


def test_losses_take_finite_gradients_at_the_optimum():
    # CKA of identical tokens and DetCon with perfectly separated masks: finite, and no NaN gradient.
    z = torch.randn(2, 5, 3, requires_grad=True)
    patch_kernel_alignment(z, z.detach()).backward()
    assert torch.isfinite(z.grad).all()
    q = F.normalize(torch.randn(2, 3, 4), dim=-1).requires_grad_(True)
    ids = torch.tensor([[0, 1, 2], [0, 1, 2]])
    detcon_loss(q, q, q, q, ids, ids, 0.1).backward()
    assert torch.isfinite(q.grad).all()
