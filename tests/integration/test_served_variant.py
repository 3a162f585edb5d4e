"""``/v1/models`` says which variant this machine serves (int8 TFLite or the fp32 SavedModel) and why.

A tiny model is exported with a real full-integer TFLite file (``training.export.export_variants``);
the card's recorded accuracies are then set per case. The app runs over a real SQLite database and
a real Redis (``tests.support.api.make_api``); the worker side of the same rule is
``brainscan.runtime.load_scorer`` (tests/unit/test_variants.py covers the rule itself).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from brainscan.modelrepo import read_card
from brainscan.variants import cpu_flags, int8_flag
from tests.support.api import Api, make_api
from tests.support.services import flushed_broker

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def int8_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny/1`` with ``model-int8.tflite`` recorded in its card."""
    from tests.support.models import build_tiny_model
    from tests.support.training import write_dataset
    from training.export import export_variants

    folder = build_tiny_model(tmp_path_factory.mktemp("int8-models") / "tiny" / "1")
    calibration = write_dataset(tmp_path_factory.mktemp("calibration"), per_class=4, size=40)
    export_variants(folder, int8=True, representative_dir=calibration, samples=16, num_threads=1)
    return folder


@pytest.fixture(scope="module")
def broker() -> Iterator[str]:
    yield from flushed_broker()


def repository(tmp_path: Path, int8_folder: Path, int8: float, fp32: float) -> Path:
    """A model repository holding a copy of the int8 model whose card records these accuracies."""
    folder = tmp_path / "models" / "tiny" / "1"
    shutil.copytree(int8_folder, folder)
    card = read_card(folder)
    card.variants["tflite-int8"].update(val_accuracy=int8, savedmodel_val_accuracy=fp32)
    card.write(folder)
    return folder


def served(
    sqlite_url: str, broker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **settings: object
) -> dict:
    api_iter = make_api(sqlite_url, broker, tmp_path, monkeypatch, **settings)
    api: Api = next(api_iter)
    try:
        response = api.client.get("/v1/models", headers=api.auth())
        assert response.status_code == 200, response.text
        return response.json()
    finally:
        api_iter.close()


def test_int8_within_0_3_points_is_served_where_the_cpu_has_vnni(
    sqlite_url: str, broker: str, tmp_path: Path, int8_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repository(tmp_path, int8_folder, int8=0.9825, fp32=0.9848)
    body = served(sqlite_url, broker, tmp_path, monkeypatch)
    variant = body["variant"]
    assert (body["name"], body["version"], body["format"]) == ("tiny", "1", "savedmodel")
    assert (variant["int8_val_accuracy"], variant["fp32_val_accuracy"]) == (0.9825, 0.9848)
    flag = int8_flag(cpu_flags())
    assert variant["cpu_int8_flag"] == flag
    if flag is not None:  # this machine has VNNI/AMX
        assert variant["served"] == "tflite-int8"
        assert variant["reason"] == (
            f"int8 98.25% vs fp32 98.48% on validation (within 0.3 points) and this CPU has {flag}"
        )
    else:
        assert variant["served"] == "savedmodel"
        assert "no int8 dot-product instructions" in variant["reason"]


def test_int8_losing_more_than_0_3_points_is_not_served(
    sqlite_url: str, broker: str, tmp_path: Path, int8_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repository(tmp_path, int8_folder, int8=0.9700, fp32=0.9848)
    variant = served(sqlite_url, broker, tmp_path, monkeypatch)["variant"]
    assert (variant["served"], variant["reason"]) == (
        "savedmodel",
        "int8 97.00% vs fp32 98.48% on validation: more than 0.3 points lost",
    )


def test_the_setting_overrides_the_rule(
    sqlite_url: str, broker: str, tmp_path: Path, int8_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repository(tmp_path, int8_folder, int8=0.9825, fp32=0.9848)
    variant = served(sqlite_url, broker, tmp_path, monkeypatch, model_format="savedmodel")["variant"]
    assert (variant["served"], variant["reason"]) == ("savedmodel", "BRAINSCAN_MODEL_FORMAT")


def test_the_workers_loader_applies_the_same_rule(tmp_path: Path, int8_folder: Path) -> None:
    from brainscan.runtime import load_scorer
    from brainscan.variants import choose_variant

    folder = repository(tmp_path, int8_folder, int8=0.9825, fp32=0.9848)
    choice = choose_variant(read_card(folder), folder)
    scorer = load_scorer(folder, model_format="", num_threads=1)
    assert (scorer.variant, scorer.variant_reason) == (choice.variant, choice.reason)
    assert scorer.variant == ("tflite-int8" if int8_flag(cpu_flags()) else "savedmodel")
    forced = load_scorer(folder, model_format="savedmodel", num_threads=1)
    assert (forced.variant, forced.variant_reason) == ("savedmodel", "BRAINSCAN_MODEL_FORMAT")
