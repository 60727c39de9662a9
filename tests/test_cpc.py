"""CPC v1/v2: the loss against hand computations, the patch grid (views, augmentation, the exported
mean-pooled patch encoder, ONNX), the masked context network, directions, checkpoints, two processes against
one, and short learning runs on CIFAR-10."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

import trainer.objectives.cpc  # noqa: F401  (registration)
import trainer.objectives.cpc2  # noqa: F401
from distributed_helpers import assert_two_processes_match_one
from trainer.data.patches import PatchAugmentConfig, PatchGridViews, crop_and_flip_patches, drop_colours
from trainer.losses.cpc import cpc_logits, cpc_loss
from trainer.models import EmbeddingModel, ModelConfig, load_model, save_model
from trainer.models.embedding import PatchGridEncoder, grid_patches
from trainer.objectives import ObjectiveSpec, get_objective
from trainer.objectives.cpc import RowPredictor, orient

SIZE = 16  # objectives in unit tests: 16 px images, 8 px patches at stride 4 -> a 3 x 3 grid
SMALL = {"cpc": {"prediction_steps": 2, "context_layers": 2, "context_hidden_dim": 16},
         "cpc2": {"patch": 8, "stride": 4, "prediction_steps": 2, "skip_steps": 1, "context_layers": 1,
                  "context_hidden_dim": 16, "target_dim": 8}}


def _build(key: str, seed: int = 0, **options):
    torch.manual_seed(seed)
    spec = ObjectiveSpec(backbone="cnn-small", image_size=SIZE, options={**SMALL[key], **options})
    return get_objective(key).build(spec)


def _patches(n: int = 4, seed: int = 1, step: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed + 100 * step)
    return {"patches": torch.randn(n, 3, 3, 3, 8, 8, generator=generator)}


def test_cpc_loss_matches_a_hand_worked_example_with_other_images_as_negatives():
    # Two images, a 2 x 1 grid, D = 2. Patches in order: (img0,row0) [1,0], (img0,row1) [0,1],
    # (img1,row0) [1,1], (img1,row1) [0,0]. Step 1: row 0 of each image predicts its row 1.
    targets = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]], [[[1.0, 1.0]], [[0.0, 0.0]]]])
    predictions = {1: torch.tensor([[[[2.0, 1.0]]], [[[0.0, 1.0]]]])}
    # img0: scores [2, 1, 3, 0], the true patch is index 1 (score 1) -> log(e^3 + e^2 + e + 1) - 1 = 2.440188
    # img1: scores [0, 1, 1, 0], the true patch is index 3 (score 0) -> log(2 + 2e) - 0 = 2.006411
    assert cpc_loss(predictions, targets).item() == pytest.approx((2.440188 + 2.006411) / 2, abs=1e-5)
    logits, labels = cpc_logits(predictions[1], targets, 1)
    assert logits.tolist() == [[2.0, 1.0, 3.0, 0.0], [0.0, 1.0, 1.0, 0.0]] and labels.tolist() == [1, 3]


def test_cpc_loss_averages_each_step_then_the_steps():
    # One image, a 3 x 1 grid of scalars z = [1, 2, 0]. Step 1: rows 0, 1 predict 1 and -1 for rows 1, 2;
    # step 2: row 0 predicts 0.5 for row 2.
    targets = torch.tensor([1.0, 2.0, 0.0]).view(1, 3, 1, 1)
    predictions = {1: torch.tensor([1.0, -1.0]).view(1, 2, 1, 1), 2: torch.tensor([0.5]).view(1, 1, 1, 1)}
    step1 = ((math.log(math.e + math.e ** 2 + 1) - 2) + math.log(math.exp(-1) + math.exp(-2) + 1)) / 2  # 0.407606
    step2 = math.log(math.exp(0.5) + math.e + 1)  # scores [0.5, 1, 0], true patch 2 (score 0): 1.680270
    assert step1 == pytest.approx(0.407606, abs=1e-6) and step2 == pytest.approx(1.680270, abs=1e-6)
    assert cpc_loss(predictions, targets).item() == pytest.approx((0.407606 + 1.680270) / 2, abs=1e-5)


def test_cpc_loss_rejects_mismatched_shapes():
    targets = torch.randn(2, 3, 3, 4)
    with pytest.raises(ValueError, match="step-1"):
        cpc_loss({1: torch.randn(2, 3, 3, 4)}, targets)
    with pytest.raises(ValueError):
        cpc_loss({3: torch.randn(2, 0, 3, 4)}, targets)
    with pytest.raises(ValueError):
        cpc_loss({}, targets)


def test_grid_patches_are_the_overlapping_windows():
    images = torch.randn(2, 3, 32, 32)
    grid = grid_patches(images, 8, 4)
    assert grid.shape == (2, 7, 7, 3, 8, 8)
    assert torch.equal(grid[1, 2, 5], images[1, :, 8:16, 20:28])
    assert torch.equal(grid[0, 6, 0], images[0, :, 24:32, 0:8])


def test_patch_grid_model_mean_pools_the_patch_encoder_and_keeps_other_configs_unchanged():
    torch.manual_seed(0)
    model = EmbeddingModel(ModelConfig(backbone="cnn-small", image_size=SIZE, patch_grid={"patch": 8})).eval()
    assert model.config.patch_grid == {"patch": 8, "stride": 4} and isinstance(model.backbone, PatchGridEncoder)
    images = torch.randn(3, 3, SIZE, SIZE)
    patches = [images[:, :, i:i + 8, j:j + 8] for i in (0, 4, 8) for j in (0, 4, 8)]
    with torch.no_grad():
        expected = torch.stack([model.backbone.encoder(p) for p in patches]).mean(0)
        assert torch.allclose(model.encode_image(images), expected, atol=1e-5)
    plain = EmbeddingModel(ModelConfig(backbone="cnn-small", image_size=SIZE))
    assert not isinstance(plain.backbone, PatchGridEncoder) and plain.config.patch_grid is None
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())


@pytest.mark.parametrize("grid,match", [({"patch": 8, "stride": 5}, "tile"), ({"patch": 40}, "patch <="),
                                        ({"patch": 8, "size": 2}, "unknown"), ({"stride": 4}, "patch size")])
def test_patch_grid_rejects_bad_settings(grid, match):
    with pytest.raises(ValueError, match=match):
        EmbeddingModel(ModelConfig(backbone="cnn-small", image_size=32, patch_grid=grid))


def test_patch_grid_refuses_view_split_and_unknown_norm():
    with pytest.raises(ValueError, match="plain backbone"):
        EmbeddingModel(ModelConfig(backbone="cnn-small", image_size=32, patch_grid={"patch": 8}, colour_space="lab"))
    with pytest.raises(ValueError, match="backbone_norm"):
        EmbeddingModel(ModelConfig(backbone="cnn-small", image_size=32, backbone_norm="instance"))


def test_layer_norm_backbone_saves_loads_and_exports_to_onnx(tmp_path):
    from export.onnx import export_model

    torch.manual_seed(0)
    config = ModelConfig(backbone="cnn-small", image_size=SIZE, patch_grid={"patch": 8, "stride": 4},
                         backbone_norm="layer")
    model = EmbeddingModel(config)
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm))]
    assert norms and all(isinstance(m, torch.nn.GroupNorm) and m.num_groups == 1 for m in norms)
    x = torch.randn(4, norms[1].num_channels, 2, 2)
    with torch.no_grad():
        norms[1].weight.normal_(), norms[1].bias.normal_()
        layer_norm = F.layer_norm(x, x.shape[1:]) * norms[1].weight.view(1, -1, 1, 1) + norms[1].bias.view(1, -1, 1, 1)
        assert torch.allclose(norms[1](x), layer_norm, atol=1e-5)  # layer norm over (C, H, W), per-channel affine
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # not the init, so a wrong reload would show
    save_model(model, str(tmp_path / "model"), {"objective": "cpc2"})
    loaded, saved = load_model(str(tmp_path / "model"))
    assert saved["model"]["patch_grid"] == {"patch": 8, "stride": 4} and saved["model"]["backbone_norm"] == "layer"
    images = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(images), model.eval().encode_image(images), atol=1e-6)
    report = export_model(str(tmp_path / "model"), str(tmp_path / "onnx"))
    assert report["image"]["max_abs_diff"] < 1e-4 and (tmp_path / "onnx" / "image_encoder.onnx").exists()


def _image(seed: int = 0, size: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_patch_views_without_augmentation_are_the_normalised_image_grid():
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    views = PatchGridViews(32, 8, 4, mean, std, crop_scale=(1.0, 1.0), flip=0.0)
    image = _image()
    patches = views(image, None)["patches"]
    expected = grid_patches(T.Normalize(mean, std)(T.ToTensor()(image))[None], 8, 4)[0]
    assert patches.shape == (7, 7, 3, 8, 8) and torch.allclose(patches, expected, atol=1e-6)
    augmented = PatchGridViews(32, 12, 4, mean, std, patch_augment=PatchAugmentConfig((0.5, 1.0), 0.5, 0.5))
    assert augmented(image, None)["patches"].shape == (6, 6, 3, 12, 12)


def test_patch_crop_flip_and_colour_drop():
    patches = torch.randn(6, 3, 8, 8)
    assert torch.allclose(crop_and_flip_patches(patches, (1.0, 1.0), 0.0), patches, atol=1e-5)
    assert torch.allclose(crop_and_flip_patches(patches, (1.0, 1.0), 1.0), patches.flip(-1), atol=1e-5)
    generator = torch.Generator().manual_seed(0)
    cropped = crop_and_flip_patches(patches, (0.25, 0.25), 0.0, generator)  # a 4 x 4 window blown up 2x
    assert cropped.shape == patches.shape and not torch.allclose(cropped, patches, atol=1e-2)
    assert cropped.min() >= patches.min() - 1e-5 and cropped.max() <= patches.max() + 1e-5  # interpolation only
    dropped = drop_colours(patches, 1.0, generator)
    kept = (dropped != 0).flatten(2).any(2)  # [6, 3]: which channels survive
    assert kept.sum(1).tolist() == [1] * 6
    assert torch.equal(dropped[kept], patches[kept])
    assert torch.equal(drop_colours(patches, 0.0, generator), patches)
    with pytest.raises(ValueError):
        PatchAugmentConfig(crop_scale=(0.0, 1.0))


def test_context_network_sees_only_rows_above_and_the_row_itself():
    torch.manual_seed(0)
    predictor = RowPredictor(dim=8, hidden_dim=8, layers=3, target_dim=5, steps=[1, 2])
    z = torch.randn(2, 6, 4, 8)
    changed = z.clone()
    changed[:, 3:] += torch.randn_like(changed[:, 3:])  # rows 3.. differ
    with torch.no_grad():
        before, after = predictor(z), predictor(changed)
    assert before[1].shape == (2, 5, 4, 5) and before[2].shape == (2, 4, 4, 5)
    for k in (1, 2):
        assert torch.allclose(before[k][:, :3], after[k][:, :3])  # rows 0-2 predict from rows <= their own
        assert not torch.allclose(before[k][:, 3:], after[k][:, 3:])


def test_orient_turns_each_direction_into_top_down():
    grid = torch.arange(6.0).view(1, 2, 3, 1)  # [[0, 1, 2], [3, 4, 5]]
    assert orient(grid, "down")[0, :, :, 0].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert orient(grid, "up")[0, :, :, 0].tolist() == [[3, 4, 5], [0, 1, 2]]
    assert orient(grid, "right")[0, :, :, 0].tolist() == [[0, 3], [1, 4], [2, 5]]  # next "row" = next column
    assert orient(grid, "left")[0, :, :, 0].tolist() == [[2, 5], [1, 4], [0, 3]]


def test_cpc_forward_is_the_loss_of_the_patch_grid():
    objective = _build("cpc")
    batch = _patches()
    outputs = objective(batch)
    z = objective.encoder.backbone.encode_grid(batch["patches"])
    predictions = objective.predictors["down"](z)
    assert sorted(predictions) == [1, 2]
    assert torch.allclose(outputs["loss"], cpc_loss(predictions, z), rtol=1e-5)
    assert 0 < outputs["embedding_std"] <= 2 and set(outputs) == {"loss", "embedding_std"}


def test_cpc2_predicts_in_four_directions_with_layer_norm_and_its_own_networks():
    objective = _build("cpc2")
    assert sorted(objective.predictors) == ["down", "left", "right", "up"]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in objective.encoder.modules())
    assert objective.encoder.config.backbone_norm == "layer"
    batch = _patches()
    outputs = objective(batch)
    z = objective.encoder.backbone.encode_grid(batch["patches"])
    targets = objective.target_projection(z)
    for direction in ("down", "up", "right", "left"):
        predictions = {k: 0.1 * p for k, p in objective.predictors[direction](orient(z, direction)).items()}
        assert sorted(predictions) == [2]  # skip_steps 1: only k = 2
        expected = cpc_loss(predictions, orient(targets, direction))
        assert torch.allclose(outputs[f"loss_{direction}"], expected, rtol=1e-5)
    per_direction = torch.stack([outputs[f"loss_{d}"] for d in ("down", "up", "right", "left")])
    assert torch.allclose(outputs["loss"], per_direction.mean())
    views = objective.views()
    assert views.patch_augment is not None and views(_image(size=SIZE), None)["patches"].shape == (3, 3, 3, 8, 8)


@pytest.mark.parametrize("options,match", [({"prediction_steps": 3}, "grid size"), ({"skip_steps": 2}, "skip_steps"),
                                           ({"directions": ["down", "sideways"]}, "directions"),
                                           ({"stride": 3}, "tile"), ({"unknown": 1}, "unknown")])
def test_bad_options_are_clear_errors(options, match):
    with pytest.raises(ValueError, match=match):
        _build("cpc", **options)


@pytest.mark.parametrize("key", ["cpc", "cpc2"])
def test_state_survives_state_dict_save_and_load(key, tmp_path):
    objective = _build(key)
    optimizer = torch.optim.SGD(objective.parameters(), lr=0.1)
    for step in range(2):
        objective(_patches(step=step))["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.save(objective.state_dict(), tmp_path / "state.pt")
    restored = _build(key, seed=7)
    restored.load_state_dict(torch.load(tmp_path / "state.pt"))
    assert any(name.startswith("predictors.") for name in restored.state_dict())
    objective.eval(), restored.eval()
    batch = _patches(step=5)
    assert torch.allclose(objective(batch)["loss"], restored(batch)["loss"])


def _global_batch(step: int = 0) -> dict:
    return _patches(8, step=step)


def _build_cpc():  # module level: the two-process helper pickles these
    return _build("cpc")


def _build_cpc2():
    return _build("cpc2")


@pytest.mark.parametrize("build", [_build_cpc, _build_cpc2])
def test_two_processes_equal_one_process(build, tmp_path):
    """Negatives are all patches of the global batch (gathered with gradient); cpc's batch norm runs over the
    patches of every process."""
    assert_two_processes_match_one(build, _global_batch, tmp_path)
