"""The objective base's shared machinery: option parsing with deprecated aliases, the InfoNCE options mixin's
one validation, the default model config and two-view recipe, and the pure Sinkhorn's reduce hooks."""
import dataclasses
import threading
import warnings

import pytest
import torch

import trainer.objectives  # noqa: F401  (registration)
from trainer.data.views import TwoViews
from trainer.losses import CONTRASTIVE_LOSSES
from trainer.losses.clustering import sinkhorn
from trainer.objectives import ObjectiveSpec, get_objective, list_objectives
from trainer.objectives.base import parse_options
from trainer.objectives.options import InfoNCEOptions

INFONCE_FAMILY = ["cmc", "curl", "instdisc", "invaspread", "moco", "moco2", "moco3", "nnclr", "simclr", "simclr2"]
RENAMED = [("moco", "embed_dim", "projection_dim"), ("moco2", "embed_dim", "projection_dim"),
           ("clip", "embed_dim", "projection_dim"), ("instdisc", "feature_dim", "projection_dim"),
           ("invaspread", "feature_dim", "projection_dim"), ("curl", "feature_dim", "projection_dim"),
           ("exemplar", "feature_dim", "projection_dim"), ("colorization", "head_dim", "head_hidden_dim")]


@pytest.mark.parametrize("key, old, new", RENAMED)
def test_deprecated_option_names_warn_and_map_to_the_new_name(key, old, new):
    options_type = get_objective(key).Options
    with pytest.warns(FutureWarning, match=f"{old!r} is deprecated, use {new!r}"):
        parsed = parse_options(options_type, {old: 24}, key)
    assert getattr(parsed, new) == 24 and not hasattr(parsed, old)
    with pytest.raises(ValueError, match=f"{old!r} is the deprecated name of {new!r}"):
        parse_options(options_type, {old: 24, new: 24}, key)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert getattr(parse_options(options_type, {new: 24}, key), new) == 24  # the new name: no warning


def test_aliases_name_real_fields_and_every_options_type_parses_its_defaults():
    for key in list_objectives():
        options_type = get_objective(key).Options
        if key == "multitask":
            continue  # needs at least one task
        fields = {f.name for f in dataclasses.fields(options_type)}
        for old, new in getattr(options_type, "ALIASES", {}).items():
            assert new in fields and old not in fields, (key, old, new)
        parse_options(options_type, {}, key)


@pytest.mark.parametrize("key", INFONCE_FAMILY)
def test_infonce_family_objectives_share_one_validated_loss_switch(key):
    options_type = get_objective(key).Options
    assert issubclass(options_type, InfoNCEOptions)
    known = ", ".join((*options_type.EXTRA_LOSSES, *CONTRASTIVE_LOSSES))
    with pytest.raises(ValueError, match=f"^{key}: loss 'foo' is not one of {known}$"):
        parse_options(options_type, {"loss": "foo"}, key)
    for bad, message in [({"temperature": 0}, "temperature must be > 0, got 0"),
                         ({"tau_plus": 1.0}, r"tau_plus must be in \[0, 1\), got 1.0"),
                         ({"beta": -0.5}, "beta must be >= 0, got -0.5"),
                         ({"noise_probability": 0.0}, r"noise_probability must be in \(0, 1\]"),
                         ({"normaliser": -1.0}, "normaliser must be > 0"),
                         ({"temperature": "cold"}, "temperature must be a number, got 'cold'")]:
        with pytest.raises(ValueError, match=f"^{key}: {message}"):
            parse_options(options_type, bad, key)
    parsed = parse_options(options_type, {"loss": "hcl", "tau_plus": 0.2, "beta": 0.5, "temperature": "5e-1"}, key)
    assert parsed.temperature == 0.5 and parsed.loss_options() == {"tau_plus": 0.2, "beta": 0.5}
    assert parse_options(options_type, {"loss": "nce"}, key).loss_options() == {"noise_probability": None,
                                                                                "normaliser": None}


def test_base_builds_the_plain_model_and_the_two_view_recipe_by_default():
    spec = ObjectiveSpec(backbone="cnn-small", image_size=32, options={"augment": {"blur_prob": 0.0}})
    simclr = get_objective("simclr").build(spec)
    assert simclr.options.augment == {"blur_prob": 0.0} and simclr.spec is spec
    config = simclr.encoder.config
    assert (config.backbone, config.image_size, config.image_projection, config.view_channels) == \
        ("cnn-small", 32, None, None)
    views = simclr.views()
    assert isinstance(views, TwoViews) and views.second_config is None and views.config.blur_prob == 0.0
    byol = get_objective("byol").build(ObjectiveSpec(backbone="cnn-small", image_size=32,
                                                     options={"projection_hidden_dim": 8, "predictor_hidden_dim": 8}))
    views = byol.views()  # second_view_augment laid over augment for view1
    assert views.config.blur_prob == 1.0 and views.second_config.blur_prob == 0.1
    # Overrides: the exported projection of instdisc, the colour split of cmc.
    instdisc = get_objective("instdisc").build(ObjectiveSpec(backbone="cnn-small", image_size=32, num_train_samples=10,
                                                             options={"projection_dim": 12}))
    assert instdisc.encoder.config.image_projection == 12 and instdisc.encoder.embed_dim == 12
    cmc = get_objective("cmc").build(ObjectiveSpec(backbone="cnn-small", image_size=32))
    assert cmc.encoder.config.colour_space == "lab" and cmc.encoder.config.view_channels == [[0], [1, 2]]


def test_sinkhorn_over_parts_with_the_callers_reduces_equals_sinkhorn_over_the_whole():
    """The caller's collectives simulated by two threads, each holding half of the batch."""
    torch.manual_seed(0)
    scores = torch.randn(12, 5)
    halves, slots, out = scores.chunk(2), [None, None], [None, None]
    barrier = threading.Barrier(2)

    def collective(part, op):
        def reduce(tensor):
            slots[part] = tensor.clone()
            barrier.wait()
            result = op(slots[0], slots[1])
            barrier.wait()
            return result
        return reduce

    def run(part):
        out[part] = sinkhorn(halves[part], 0.1, 3, reduce_sum=collective(part, torch.add),
                             reduce_max=collective(part, torch.maximum), total_samples=len(scores))

    threads = [threading.Thread(target=run, args=(part,)) for part in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert torch.allclose(torch.cat(out), sinkhorn(scores, 0.1, 3), atol=1e-6)


@pytest.mark.parametrize("key,options,message", [
    ("byol", {"projection_dim": 0}, "byol: projection_dim must be >= 1, got 0"),
    ("simsiam", {"projection_layers": 0}, "simsiam: projection_layers must be >= 1, got 0"),
    ("jigsaw", {"grid": 1}, "jigsaw: grid must be >= 2, got 1"),
    ("moco", {"queue_size": 0}, "moco: queue_size must be >= 1, got 0"),
    ("barlow_twins", {"lambd": "lots"}, "barlow_twins: lambd must be a number, got 'lots'"),
    ("byol", {"momentum": "0.99", "final_momentum": "1e0"}, None),  # YAML strings are read as numbers
])
def test_shared_validation_names_the_objective_and_the_value(key: str, options: dict, message: str | None) -> None:
    options_type = get_objective(key).Options
    if message is None:
        parsed = parse_options(options_type, options, key)
        assert parsed.momentum == 0.99 and parsed.final_momentum == 1.0
        return
    with pytest.raises(ValueError) as error:
        parse_options(options_type, options, key)
    assert str(error.value) == message
