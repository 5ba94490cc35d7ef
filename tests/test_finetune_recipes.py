"""Recipes: the shipped ones validate; unknown keys / wrong types are refused naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest

from dynopool_convert.errors import UserInputError
from dynopool_convert.training import load_recipe, merge_config

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def test_the_four_recipes_exist_and_validate():
    names = {p.stem for p in RECIPES}
    assert {"quick-cpu-demo", "fashion-mnist", "cifar100-vgg16", "resnet50-imagenet-4g"} <= names
    for path in RECIPES:
        cfg = merge_config(load_recipe(path))
        assert cfg.model and cfg.budget and cfg.data and (cfg.train.epochs or cfg.train.steps)


def _recipe(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, key",
    [
        ("trian: {lr: 0.1}\n", "trian"),
        ("train: {lr: 0.1, warmup: 3}\n", "train.warmup"),
        ("train: {lr: fast}\n", "train.lr"),
        ("train: {batch_size: 3.5}\n", "train.batch_size"),
        ("train: {epochs: true}\n", "train.epochs"),
        ("augment: {crop_scale: [0.5]}\n", "augment.crop_scale"),
        ("convert: [before]\n", "convert"),
        ("convert: {patchify: maybe}\n", "convert.patchify"),
        ("input_size: [3, x, 32]\n", "'input_size'"),
        ("train: {epochs: 2, steps: 5}\n", "train.epochs or train.steps"),
        ("train: {batch_size: 0}\n", "train.batch_size"),
        ("train: {budget_mode: floor}\n", "train.budget_mode"),
    ],
)
def test_bad_recipes_name_the_key(tmp_path, text, key):
    with pytest.raises(UserInputError) as err:
        load_recipe(_recipe(tmp_path, text))
    assert key in str(err.value) and "\n" not in str(err.value)


def test_recipe_convert_section_says_patchify(tmp_path):
    assert merge_config(load_recipe(_recipe(tmp_path, "convert: {patchify: false}\n"))).convert.patchify is False
    assert merge_config(load_recipe(_recipe(tmp_path, "convert: {input_site: true}\n"))).convert.patchify is None


def test_flags_override_recipe_and_steps_replace_epochs(tmp_path):
    recipe = load_recipe(_recipe(tmp_path, "budget: 5M\ntrain: {epochs: 3, lr: 0.1, seed: 1}\n"))
    cfg = merge_config(recipe, {"train": {"lr": 0.01, "steps": 7}, "budget": "6M"})
    assert cfg.train.lr == 0.01 and cfg.train.steps == 7 and cfg.train.epochs is None
    assert cfg.train.seed == 1 and cfg.budget == "6M"
    assert merge_config(recipe).train.epochs == 3
    assert merge_config({"train": {"lr": 1}}).train.lr == 1.0  # ints are fine for floats


def test_missing_or_invalid_yaml(tmp_path):
    with pytest.raises(UserInputError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(UserInputError, match="YAML"):
        load_recipe(_recipe(tmp_path, "train: {lr: [\n"))
    with pytest.raises(UserInputError, match="mapping"):
        load_recipe(_recipe(tmp_path, "- 1\n- 2\n"))
