"""Training precision: bfloat16 only where this machine computes it faster than float32."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from training import train
from training.recipe import COMPACT_RECIPE, RESNET50_RECIPE


def never_timed(recipe: object, precision: str) -> float:
    raise AssertionError(f"a training step was timed ({precision}) where the hardware decides")


@pytest.mark.parametrize(("support", "expected"), [("native", "mixed_bfloat16"), ("none", "float32")])
def test_amx_or_a_gpu_train_in_bfloat16_and_emulation_never_does(
    support: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(train, "bf16_support", lambda: support)
    assert train.choose_precision(COMPACT_RECIPE, step_seconds=never_timed) == expected


@pytest.mark.parametrize(
    ("bf16_seconds", "float32_seconds", "expected"),
    [(0.71, 0.48, "float32"), (0.68, 0.98, "mixed_bfloat16")],  # a Xeon without AMX; an AMD EPYC
)
def test_avx512_bf16_without_amx_trains_in_whichever_step_was_faster(
    bf16_seconds: float,
    float32_seconds: float,
    expected: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(train, "bf16_support", lambda: "partial")
    timings = {"mixed_bfloat16": bf16_seconds, "float32": float32_seconds}
    assert train.choose_precision(COMPACT_RECIPE, step_seconds=lambda _, p: timings[p]) == expected
    assert f"-> {expected}" in capsys.readouterr().err  # the log says what was measured and chosen


def test_a_float32_recipe_is_never_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train, "bf16_support", lambda: "partial")
    assert RESNET50_RECIPE.precision == "float32"
    assert train.choose_precision(RESNET50_RECIPE, step_seconds=never_timed) == "float32"


def test_a_step_is_timed_on_the_recipes_own_model() -> None:
    small = replace(COMPACT_RECIPE, input_size=32, batch_size=4)
    assert 0 < train.training_step_seconds(small, "float32", steps=1) < 60
