"""CMC (colour-split multiview encoders) and SimCLR v2 (deep head, middle-layer export, momentum memory):
colour conversions, the exported model's new fields, losses against hand computations, ONNX parity,
two-process equivalence and short learning runs."""
import json

import pytest
import torch
import torch.nn.functional as F

import trainer.objectives.cmc  # noqa: F401  (registration)
import trainer.objectives.simclr2  # noqa: F401  (registration)
from distributed_helpers import assert_two_processes_match_one
from trainer.losses import info_nce, nt_xent
from trainer.models import EmbeddingModel, ModelConfig, load_model, save_model
from trainer.models.colour import ColourSpace, rgb_to_lab, rgb_to_ycbcr
from trainer.objectives import ObjectiveSpec, get_objective
from trainer.objectives.cmc import view_pairs
from trainer.objectives.simclr2 import nt_xent_similarities

SIZE = 16
MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def _pixels(*rgb):
    return torch.tensor(rgb, dtype=torch.float32).view(len(rgb), 3, 1, 1)


# Reference values: CIE L*a*b* (D65, 2 deg) of sRGB primaries, as tabulated by colour calculators (EasyRGB,
# Bruce Lindbloom) and returned by skimage.color.rgb2lab.
LAB_REFERENCE = [
    ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0)),
    ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
    ((1.0, 0.0, 0.0), (53.2408, 80.0925, 67.2032)),
    ((0.0, 1.0, 0.0), (87.7347, -86.1827, 83.1793)),
    ((0.0, 0.0, 1.0), (32.2970, 79.1875, -107.8602)),
    ((128 / 255, 128 / 255, 128 / 255), (53.5850, 0.0, 0.0)),
]


def test_rgb_to_lab_matches_reference_colours():
    lab = rgb_to_lab(_pixels(*[rgb for rgb, _ in LAB_REFERENCE])).view(-1, 3)
    expected = torch.tensor([ref for _, ref in LAB_REFERENCE])
    assert torch.allclose(lab, expected, atol=0.02), (lab, expected)


def test_rgb_to_ycbcr_is_bt601_full_range():
    ycbcr = rgb_to_ycbcr(_pixels((1, 1, 1), (1, 0, 0), (0, 0, 1))).view(-1, 3)
    expected = torch.tensor([[1.0, 0.0, 0.0], [0.299, -0.168736, 0.5], [0.114, 0.5, -0.081312]])
    assert torch.allclose(ycbcr, expected, atol=1e-5)


def test_colour_space_unnormalises_converts_and_scales_to_unit_range():
    torch.manual_seed(0)
    rgb = torch.rand(4, 3, 8, 8)
    normalised = (rgb - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    lab = ColourSpace("lab", MEAN, STD)(normalised)
    raw = rgb_to_lab(rgb)
    assert torch.allclose(lab[:, 0], (raw[:, 0] - 50) / 50, atol=1e-4)  # L in [0, 100] -> [-1, 1]
    assert lab.abs().max() <= 1.01
    # Out-of-gamut inputs (random normal "pixels") are clamped to [0, 1] first, never NaN.
    assert torch.isfinite(ColourSpace("lab", MEAN, STD)(torch.randn(2, 3, 8, 8) * 5)).all()
    with pytest.raises(ValueError, match="unknown colour space"):
        ColourSpace("hsv", MEAN, STD)


def test_view_split_encoder_runs_one_backbone_per_channel_group():
    torch.manual_seed(0)
    model = EmbeddingModel(ModelConfig(backbone="cnn-small", image_size=SIZE, colour_space="ycbcr",
                                       view_channels=[[0], [1, 2]])).eval()
    split = model.backbone
    assert [e.features[0].in_channels for e in split.encoders] == [1, 2]
    images = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        views = split.forward_views(images)
        converted = split.colour(images)
        assert [tuple(v.shape) for v in views] == [(3, 256), (3, 256)]
        assert torch.equal(views[1], split.encoders[1](converted[:, [1, 2]]))
        assert torch.equal(model.encode_image(images), torch.cat(views, dim=1))
    assert model.embed_dim == model.feature_dim == 512
    with pytest.raises(ValueError, match="view_channels"):
        EmbeddingModel(ModelConfig(backbone="cnn-small", image_size=SIZE, colour_space="lab", view_channels=[[0], [3]]))


def test_view_pairs_core_and_full_graph():
    assert view_pairs(2, "core") == view_pairs(2, "full") == [(0, 1)]
    assert view_pairs(4, "core") == [(0, 1), (0, 2), (0, 3)]
    assert view_pairs(3, "full") == [(0, 1), (0, 2), (1, 2)]
    with pytest.raises(ValueError, match="at least 2 views"):
        view_pairs(1, "core")
    with pytest.raises(ValueError, match="pairing"):
        view_pairs(3, "star")


def _cmc(**options):
    torch.manual_seed(0)
    options = {"projection_dim": 16, **options}
    return get_objective("cmc").build(ObjectiveSpec(backbone="cnn-small", image_size=SIZE, options=options))


def _simclr2(**options):
    torch.manual_seed(0)
    options = {"projection_dim": 16, "projection_hidden_dim": 32, **options}
    return get_objective("simclr2").build(ObjectiveSpec(backbone="cnn-small", image_size=SIZE, options=options))


def test_cmc_loss_is_symmetric_infonce_over_the_chosen_pairs():
    objective = _cmc(colour_space="ycbcr", view_channels=[[0], [1], [2]], pairing="full", temperature=0.2)
    images = torch.randn(6, 3, SIZE, SIZE)
    out = objective({"image": images})
    with torch.no_grad():
        z = [head(f) for head, f in zip(objective.projectors, objective.encoder.backbone.forward_views(images))]
    expected = sum(info_nce(z[i], z[j], None, 0.2) + info_nce(z[j], z[i], None, 0.2) for i, j in [(0, 1), (0, 2), (1, 2)])
    assert torch.allclose(out["loss"], expected, atol=1e-5)
    assert set(out) == {"loss", "loss_0_1", "loss_0_2", "loss_1_2"}
    core = _cmc(colour_space="ycbcr", view_channels=[[0], [1], [2]], pairing="core")
    assert set(core({"image": images})) == {"loss", "loss_0_1", "loss_0_2"}
    out["loss"].backward()
    assert all(p.grad is not None for p in objective.parameters())
    with pytest.raises(ValueError, match="cmc: loss 'nope' is not one of infonce, nce, flatnce, debiased, hcl"):
        _cmc(loss="nope")


def test_cmc_view_recipe_is_one_crop_without_colour_distortion():
    from PIL import Image

    from trainer.data.shards import ShardSample

    recipe = _cmc(augment={"crop_scale": [0.5, 1.0]}).views()
    names = [type(t).__name__ for t in recipe.transform.transforms]
    assert "ColorJitter" not in str(recipe.transform) and "RandomGrayscale" not in names
    out = recipe(Image.new("RGB", (24, 24), (200, 30, 30)), ShardSample(key="k", url="u"))
    assert set(out) == {"image"} and out["image"].shape == (3, SIZE, SIZE)


def test_simclr2_exports_backbone_plus_first_head_layer():
    objective = _simclr2()
    encoder = objective.encoder.eval()
    assert encoder.config.image_head == {"hidden_dim": 32, "layers": 1} and encoder.embed_dim == 32
    linears = [m for m in list(encoder.image_head) + list(objective.projector) if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3 and linears[-1].out_features == 16  # the 3-layer head, split 1 + 2
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(encoder.encode_image(images), encoder.image_head(encoder.backbone(images)))
    with pytest.raises(ValueError, match="encoder_head_layers"):
        _simclr2(encoder_head_layers=3)


def test_nt_xent_similarities_reproduce_nt_xent_and_append_the_memory():
    from trainer.losses.nce_family import contrastive_loss_from_similarities

    torch.manual_seed(0)
    z1, z2, memory = torch.randn(5, 8), torch.randn(5, 8), torch.randn(7, 8)
    positive, negatives = nt_xent_similarities(z1, z2)
    assert positive.shape == (10,) and negatives.shape == (10, 8)
    assert torch.allclose(contrastive_loss_from_similarities("infonce", positive, negatives, 0.5), nt_xent(z1, z2, 0.5), atol=1e-6)
    positive, negatives = nt_xent_similarities(z1, z2, memory)
    assert negatives.shape == (10, 15)
    a = F.normalize(z1[2], dim=0)
    assert torch.allclose(positive[2], a @ F.normalize(z2[2], dim=0), atol=1e-6)
    assert torch.allclose(negatives[2, 8:], F.normalize(memory, dim=1) @ a, atol=1e-6)
    assert torch.allclose(negatives[2, :8].sort().values, torch.cat([
        F.normalize(z1[[0, 1, 3, 4]], dim=1) @ a, F.normalize(z2[[0, 1, 3, 4]], dim=1) @ a]).sort().values, atol=1e-6)


def test_simclr2_momentum_encoder_queue_and_resume_state():
    objective = _simclr2(momentum=0.9, queue_size=10, loss="debiased")
    batch = {"view0": torch.randn(4, 3, SIZE, SIZE), "view1": torch.randn(4, 3, SIZE, SIZE)}
    first = objective(batch)
    assert first["queue_fill"] == 0.0 and int(objective.queue_count) == 8
    with torch.no_grad():
        keys = F.normalize(objective.momentum_projector(objective.momentum_encoder.encode_image(
            torch.cat([batch["view0"], batch["view1"]]))), dim=1)
    objective(batch)  # 8 more keys: the FIFO wraps, the queue holds the newest 10
    assert int(objective.queue_count) == 10 and int(objective.queue_ptr) == 6
    assert torch.allclose(objective.queue[:6], keys[2:], atol=1e-5)  # second batch's keys 2..7 wrapped to 0..5
    # EMA: k <- m k + (1 - m) q.
    online, target = next(objective.encoder.parameters()), next(objective.momentum_encoder.parameters())
    with torch.no_grad():
        online.add_(1.0)
    before = target.detach().clone()
    objective.after_step(0, 10)
    assert torch.allclose(target, 0.9 * before + 0.1 * online.detach(), atol=1e-6)
    assert not any(p.requires_grad for p in objective.momentum_encoder.parameters())
    # Queue, pointer, fill and momentum weights live in the state dict: checkpoints carry them.
    state = objective.state_dict()
    assert {"queue", "queue_ptr", "queue_count"} <= set(state) and any(k.startswith("momentum_encoder.") for k in state)
    fresh = _simclr2(momentum=0.9, queue_size=10, loss="debiased")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.queue, objective.queue) and int(fresh.queue_count) == 10


def test_models_round_trip_and_old_configs_still_load(tmp_path):
    images = torch.randn(3, 3, SIZE, SIZE)
    for name, objective in [("cmc", _cmc()), ("simclr2", _simclr2())]:
        objective.train()(  # non-trivial BN running statistics
            {"image": images} if name == "cmc" else {"view0": images, "view1": images.flip(0)})
        model = objective.encoder.eval()
        save_model(model, str(tmp_path / name), {"objective": name})
        loaded, saved = load_model(str(tmp_path / name))
        assert loaded.config == model.config and saved["embed_dim"] == model.embed_dim
        with torch.no_grad():
            assert torch.allclose(model.encode_image(images), loaded.encode_image(images), atol=1e-6)
    # A config.json written before these fields existed loads as the plain single-backbone model.
    save_model(EmbeddingModel(ModelConfig(backbone="cnn-small", image_size=SIZE)).eval(), str(tmp_path / "old"), {})
    path = tmp_path / "old" / "config.json"
    saved = json.loads(path.read_text())
    for key in ("colour_space", "view_channels", "image_head"):
        del saved["model"][key]
    path.write_text(json.dumps(saved))
    loaded, _ = load_model(str(tmp_path / "old"))
    assert loaded.image_head is None and all(k.startswith("backbone.features.") for k in loaded.state_dict())


@pytest.mark.parametrize("name", ["cmc", "simclr2"])
def test_onnx_export_parity(tmp_path, name):
    from export.onnx import export_model

    objective = _cmc() if name == "cmc" else _simclr2()
    images = torch.randn(4, 3, SIZE, SIZE)
    objective.train()({"image": images} if name == "cmc" else {"view0": images, "view1": images.flip(0)})
    save_model(objective.encoder.eval(), str(tmp_path / "model"), {"objective": name})
    report = export_model(str(tmp_path / "model"), str(tmp_path / "onnx"))
    assert report["image"]["max_abs_diff"] <= 1e-4 and (tmp_path / "onnx" / "image_encoder.onnx").exists()


BATCH = 4  # per process


def _build_cmc():
    return _cmc(colour_space="ycbcr", view_channels=[[0], [1], [2]], pairing="full")


def _cmc_batch():
    return {"image": torch.randn(2 * BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))}


def _build_simclr2():
    return _simclr2(momentum=0.5, queue_size=12)


def _simclr2_batch(step):
    generator = torch.Generator().manual_seed(step)
    return {f"view{v}": torch.randn(2 * BATCH, 3, SIZE, SIZE, generator=generator) for v in range(2)}


@pytest.mark.parametrize("build,make_batch,steps", [(_build_cmc, _cmc_batch, 1), (_build_simclr2, _simclr2_batch, 2)])
def test_two_processes_equal_one_process(build, make_batch, steps, tmp_path):
    assert_two_processes_match_one(build, make_batch, tmp_path, steps=steps)
