"""A card's recorded recipe reads back as the recipe that trained the model (bench/errors.py uses it)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from training.recipe import COMPACT_RECIPE, RESNET50_RECIPE, recipe_from_record, with_overrides


@pytest.mark.parametrize(
    "recipe",
    [COMPACT_RECIPE, RESNET50_RECIPE, with_overrides(COMPACT_RECIPE, epochs=3, seed=2, input_size=224)],
    ids=["compact", "resnet50", "compact-overridden"],
)
def test_a_recorded_recipe_reads_back_equal(recipe) -> None:  # type: ignore[no-untyped-def]
    # As `brainscan train` writes it into model.json: through JSON, so tuples come back as lists.
    record = json.loads(json.dumps(asdict(recipe)))
    assert isinstance(record["stages"], list) and isinstance(record["compact_shape"]["widths"], list)
    assert recipe_from_record(record) == recipe


def test_the_default_models_recorded_recipe_reads_back_as_recorded() -> None:
    # A record `brainscan train` wrote before `--seed` existed: every recorded field comes back as it
    # was, and the field added since takes the recipe's default (version 3 was trained with that seed).
    card = json.loads((Path(__file__).parents[2] / "models/brainscan-compact/3/model.json").read_text())
    record = card["training"]["recipe"]
    rebuilt = json.loads(json.dumps(asdict(recipe_from_record(record))))
    assert {field: rebuilt[field] for field in record} == record
    assert set(rebuilt) - set(record) == {"seed", "mixup_alpha"}
    assert rebuilt["seed"] == COMPACT_RECIPE.seed and rebuilt["mixup_alpha"] == 0.0


def test_with_overrides_changes_only_what_it_names() -> None:
    changed = with_overrides(COMPACT_RECIPE, input_size=224)
    assert changed.input_size == 224
    assert asdict(changed) | {"input_size": COMPACT_RECIPE.input_size} == asdict(COMPACT_RECIPE)


def test_checkpoints_resume_only_the_settings_that_wrote_them(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from training.train import claim_checkpoints

    (tmp_path / "checkpoints").mkdir()
    claim_checkpoints(tmp_path, COMPACT_RECIPE)
    claim_checkpoints(tmp_path, COMPACT_RECIPE)  # the same run again: resumes
    with pytest.raises(ValueError, match=r"other settings \(input_size, seed\)"):
        claim_checkpoints(tmp_path, with_overrides(COMPACT_RECIPE, seed=2, input_size=224))
    # Refusing changed nothing: the first run's settings still hold the folder.
    claim_checkpoints(tmp_path, COMPACT_RECIPE)
