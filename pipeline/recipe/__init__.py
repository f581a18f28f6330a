"""Recipes: recipes/NAME.toml → `Recipe` dataclasses, validated once so every stage can trust
them: the schema (schema.py), where a recipe may reach (paths.py) and the rules across keys
(checks.py). Loading one imports no torch."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from pipeline.core.bounded import checked_path
from pipeline.recipe.checks import CHECKS
from pipeline.recipe.paths import (ALLOW_ENV, MAX_CARD_BYTES, RECIPES_DIR, allow_dir_option,
                                   allowed_dirs, find_recipe, read_card, read_merged)
from pipeline.recipe.schema import (Calibration, ConvertOptions, GGUFFile, ModelInfo,
                                    PublishOptions, Recipe, Resources, SlurmOptions, Source,
                                    TaskResources, Variant, VerifyOptions, build_recipe)

__all__ = ["ALLOW_ENV", "MAX_CARD_BYTES", "RECIPES_DIR", "Calibration", "ConvertOptions", "GGUFFile",
           "ModelInfo", "PublishOptions", "Recipe", "Resources", "SlurmOptions", "Source",
           "TaskResources", "Variant", "VerifyOptions", "allow_dir_option", "find_recipe",
           "load_recipe"]


def load_recipe(path: Path | str, allow_dirs: Sequence[Path | str] = ()) -> Recipe:
    """Read, merge (`extends`) and validate a recipe; InputError names the file and the key.
    Paths it names must lie in its own folder, one of `allow_dirs` or one in $PIPELINE_ALLOW_DIRS."""
    path = checked_path(path, "recipe").resolve()
    allowed = allowed_dirs(allow_dirs)
    raw = read_merged(path, (), allowed)
    digest = hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()
    recipe = build_recipe(path, raw)
    card = recipe.model.original_card
    if card is not None:
        model = dataclasses.replace(recipe.model, original_card_text=read_card(path, card))
        recipe = dataclasses.replace(recipe, model=model)
    for check in CHECKS:
        check(recipe)
    return dataclasses.replace(recipe, allow_dirs=allowed, digest=digest)
