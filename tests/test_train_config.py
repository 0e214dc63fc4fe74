"""Training recipes: the bundled ones load; a bad key or value is an error naming it and the file."""
from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config import load_train_config

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = "base: models/tiny-flux\ndata: ['runs/default/shards/*.tar']\nout_dir: runs/x\n"


@pytest.mark.parametrize("name", ["tiny-cpu", "flux-dev-gpu", "flux-dev-1024-gpu"])
def test_the_bundled_recipes_load(name):
    cfg = load_train_config(ROOT / "trainer" / "recipes" / f"{name}.yaml")
    assert cfg.validation is not None and cfg.steps > 0
    if name.startswith("flux-dev"):  # the README launches them on 8 GPUs
        assert cfg.tasks_per_batch * cfg.pairs_per_task % 8 == 0


@pytest.mark.parametrize("extra, message", [
    ("stepz: 3\n", r"stepz: Extra inputs are not permitted"),
    ("steps: 0\n", r"steps: Input should be greater than or equal to 1"),
    ("validation: {sigmas: [0.0, 0.5]}\n", r"validation: Value error, validation sigmas must lie in \(0, 1\)"),
    ("validation: {every: 10, pairs: 2}\n", r"validation.pairs: Extra inputs are not permitted"),
    ("text_encoder: x2i\n", r"\(recipe\): Value error, text_encoder x2i needs an `x2i:` block"),
    ("steps: [\n", r"not valid YAML"),
])
def test_a_bad_recipe_names_the_file_and_the_key(tmp_path, extra, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(MINIMAL + extra)
    with pytest.raises(ValueError, match=message) as error:
        load_train_config(recipe)
    assert str(error.value).startswith(f"{recipe}: ")
