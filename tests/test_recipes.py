"""Every objective's YAML recipe loads and builds its objective (with a small backbone), so a recipe option
that the objective renamed or dropped fails here rather than in a user's run."""
import os

import pytest

import trainer.objectives as registry
from trainer.config import TrainConfig, load_recipe, recipe_path
from trainer.objectives import ObjectiveSpec, get_objective


# The objectives trainer/ registers (tests may register their own, without recipes).
BUILT_IN = sorted(key for key in registry.list_objectives() if get_objective(key).__module__.startswith("trainer."))


def test_every_built_in_objective_is_registered_and_has_a_recipe():
    assert len(BUILT_IN) >= 29
    assert all(os.path.exists(recipe_path(key)) for key in BUILT_IN)


@pytest.mark.parametrize("key", BUILT_IN)
def test_recipe_builds_its_objective(key):
    config = load_recipe(recipe_path(key), TrainConfig(objective=key))
    spec = ObjectiveSpec(backbone="cnn-small", image_size=config.data.image_size, num_train_samples=1000,
                         total_steps=100, global_batch_size=config.batch_size, options=config.objective_options)
    objective = get_objective(key).build(spec)
    assert callable(objective.views())
