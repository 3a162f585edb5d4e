"""brainscan/modelrepo.py: which model serves (``resolve_model``) and promotion, on real folders.

The rules (README, "Models"): ``BRAINSCAN_MODEL_NAME``/``BRAINSCAN_MODEL_VERSION`` if set, else
``promoted.json``, else the only model's newest version; several models and no promotion is an
error that says what to do. Choosing a model reads folders and cards only, so the "models" here are
card-only folders (and one card-less ``saved_model.pb``); nothing is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from brainscan.modelrepo import (
    CARD_FILE,
    PROMOTED_FILE,
    ModelCard,
    ModelNotFound,
    list_models,
    promote,
    promoted,
    resolve_model,
)
from brainscan.settings import Settings
from tests.support.models import add_model


def served(repo: Path, name: str = "", version: str = "") -> tuple[str, str, Path]:
    ref = resolve_model(repo, name, version)
    return ref.card.name, ref.card.version, ref.path


def settings_from_env(monkeypatch: pytest.MonkeyPatch, repo: Path, name: str, version: str) -> Settings:
    monkeypatch.setenv("BRAINSCAN_MODEL_DIR", str(repo))
    monkeypatch.setenv("BRAINSCAN_MODEL_NAME", name)
    monkeypatch.setenv("BRAINSCAN_MODEL_VERSION", version)
    return Settings()


# ---- the only model ------------------------------------------------------------------------------
def test_the_only_models_newest_version_serves(tmp_path: Path) -> None:
    for version in ("1", "2", "9", "10"):
        add_model(tmp_path, "tiny", version)
    assert served(tmp_path) == ("tiny", "10", tmp_path / "tiny" / "10")  # 10 after 9: numeric order


def test_dotted_versions_sort_part_by_part(tmp_path: Path) -> None:
    for version in ("1.9", "1.10", "1.2"):
        add_model(tmp_path, "tiny", version)
    assert [ref.path.name for ref in list_models(tmp_path)] == ["1.2", "1.9", "1.10"]
    assert served(tmp_path)[1] == "1.10"


def test_folders_that_are_not_models_are_ignored(tmp_path: Path) -> None:
    add_model(tmp_path, "tiny", "1")
    (tmp_path / "tiny" / "2").mkdir()  # an export still being copied in: no card, no SavedModel
    (tmp_path / "tiny" / "1" / "reports").mkdir()
    (tmp_path / "notes").mkdir()  # a folder with no versions
    assert served(tmp_path) == ("tiny", "1", tmp_path / "tiny" / "1")


def test_a_card_less_savedmodel_is_named_by_its_folders(tmp_path: Path) -> None:
    folder = tmp_path / "original" / "1"
    folder.mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"")
    ref = resolve_model(tmp_path)
    assert (ref.path, ref.card.name, ref.card.version, ref.card.card_less) == (folder, "original", "1", True)
    # The original project's contract: 224x224 RGB, resnet50 preprocessing.
    assert (ref.card.input_size, ref.card.channels, ref.card.preprocessing) == ((224, 224), 3, "resnet50")


def test_the_card_decides_name_and_version_not_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "folder-name" / "7"
    folder.mkdir(parents=True)
    ModelCard(name="card-name", version="3", input_size=(64, 64), channels=1).write(folder)
    ref = resolve_model(tmp_path)
    assert (ref.path, ref.card.name, ref.card.version, ref.card.input_size) == (
        folder,
        "card-name",
        "3",
        (64, 64),
    )


def test_a_model_folder_itself_serves_as_it_is(tmp_path: Path) -> None:
    folder = add_model(tmp_path, "tiny", "1")
    add_model(tmp_path, "tiny", "2")
    assert served(folder) == ("tiny", "1", folder)


# ---- promotion -------------------------------------------------------------------------------------
def test_the_promoted_version_serves_over_the_newest(tmp_path: Path) -> None:
    add_model(tmp_path, "tiny", "1")
    add_model(tmp_path, "tiny", "2")
    ref = promote(tmp_path, "tiny", "1")
    assert ref.path == tmp_path / "tiny" / "1"
    assert json.loads((tmp_path / PROMOTED_FILE).read_text()) == {"name": "tiny", "version": "1"}
    assert not (tmp_path / (PROMOTED_FILE + ".tmp")).exists()
    assert promoted(tmp_path) == ("tiny", "1")
    assert served(tmp_path) == ("tiny", "1", tmp_path / "tiny" / "1")


def test_promotion_chooses_among_several_models(tmp_path: Path) -> None:
    add_model(tmp_path, "alpha", "1")
    add_model(tmp_path, "beta", "1")
    add_model(tmp_path, "beta", "2")
    promote(tmp_path, "beta", "1")
    assert served(tmp_path) == ("beta", "1", tmp_path / "beta" / "1")
    promote(tmp_path, "alpha", "1")  # promoting again replaces the choice
    assert promoted(tmp_path) == ("alpha", "1")
    assert served(tmp_path) == ("alpha", "1", tmp_path / "alpha" / "1")


def test_promoting_a_model_that_is_not_there_changes_nothing(tmp_path: Path) -> None:
    add_model(tmp_path, "tiny", "1")
    promote(tmp_path, "tiny", "1")
    with pytest.raises(ModelNotFound, match=r"no model tiny/9 in "):
        promote(tmp_path, "tiny", "9")
    assert promoted(tmp_path) == ("tiny", "1")


def test_no_promotion_file_means_none(tmp_path: Path) -> None:
    add_model(tmp_path, "tiny", "1")
    assert promoted(tmp_path) is None


# ---- BRAINSCAN_MODEL_NAME / BRAINSCAN_MODEL_VERSION ------------------------------------------------
def test_name_and_version_from_the_environment_win_over_the_promotion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_model(tmp_path, "alpha", "1")
    add_model(tmp_path, "alpha", "2")
    add_model(tmp_path, "beta", "1")
    promote(tmp_path, "beta", "1")
    settings = settings_from_env(monkeypatch, tmp_path, "alpha", "1")
    assert served(settings.model_dir, settings.model_name, settings.model_version) == (
        "alpha",
        "1",
        tmp_path / "alpha" / "1",
    )


def test_a_pinned_name_serves_its_newest_version_and_ignores_promotions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_model(tmp_path, "alpha", "1")
    add_model(tmp_path, "alpha", "2")
    add_model(tmp_path, "beta", "1")
    promote(tmp_path, "alpha", "1")
    settings = settings_from_env(monkeypatch, tmp_path, "alpha", "")
    assert served(settings.model_dir, settings.model_name, settings.model_version)[:2] == ("alpha", "2")


def test_a_pinned_version_of_the_only_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for version in ("1", "2", "3"):
        add_model(tmp_path, "tiny", version)
    promote(tmp_path, "tiny", "3")
    settings = settings_from_env(monkeypatch, tmp_path, "", "2")
    assert served(settings.model_dir, settings.model_name, settings.model_version)[:2] == ("tiny", "2")


@pytest.mark.parametrize(
    ("name", "version", "wanted"),
    [("ghost", "", "ghost/*"), ("tiny", "9", "tiny/9"), ("", "9", "*/9"), ("ghost", "1", "ghost/1")],
)
def test_a_configured_model_that_is_not_there_is_a_clear_error(
    tmp_path: Path, name: str, version: str, wanted: str
) -> None:
    add_model(tmp_path, "tiny", "1")
    with pytest.raises(ModelNotFound) as raised:
        resolve_model(tmp_path, name, version)
    message = str(raised.value)
    assert message.startswith(f"no model {wanted} in {tmp_path.resolve()}. Train one with ")
    assert "brainscan train --data DIR --out models/<name>/<version>" in message


# ---- nothing to choose, or no way to choose -------------------------------------------------------
@pytest.mark.parametrize("layout", ["missing", "empty", "only-non-models"])
def test_no_model_is_an_error_that_says_how_to_get_one(tmp_path: Path, layout: str) -> None:
    repo = tmp_path / "models"
    if layout != "missing":
        repo.mkdir()
    if layout == "only-non-models":
        (repo / "tiny" / "1").mkdir(parents=True)
        (repo / "tiny" / "1" / "README.txt").write_text("not a model")
    with pytest.raises(ModelNotFound) as raised:
        resolve_model(repo)
    assert str(raised.value) == (
        f"no model in {repo.resolve()}. Train one with `brainscan train --data DIR --out "
        "models/<name>/<version>`, or copy a SavedModel folder to models/<name>/<version>/ "
        "(see README, 'Models')."
    )


def test_several_models_and_no_promotion_is_an_error_that_says_what_to_do(tmp_path: Path) -> None:
    add_model(tmp_path, "beta", "1")
    add_model(tmp_path, "alpha", "1")
    add_model(tmp_path, "alpha", "2")
    with pytest.raises(ModelNotFound) as raised:
        resolve_model(tmp_path)
    assert str(raised.value) == (
        f"several models in {tmp_path} (alpha, beta) and none promoted: "
        "run `brainscan models promote NAME VERSION` or set BRAINSCAN_MODEL_NAME"
    )
    promote(tmp_path, "beta", "1")  # ... and doing what it says resolves it
    assert served(tmp_path)[:2] == ("beta", "1")


def test_a_version_alone_with_several_models_says_a_name_is_needed_not_none_promoted(
    tmp_path: Path,
) -> None:
    add_model(tmp_path, "alpha", "1")
    add_model(tmp_path, "beta", "1")
    promote(tmp_path, "beta", "1")  # a promotion exists: "none promoted" would be untrue
    with pytest.raises(ModelNotFound) as raised:
        resolve_model(tmp_path, version="1")
    assert str(raised.value) == (
        f"several models in {tmp_path} (alpha, beta) have version 1: "
        "a version alone does not choose a model; set BRAINSCAN_MODEL_NAME too"
    )
    assert resolve_model(tmp_path, "alpha", "1").path == tmp_path / "alpha" / "1"


def test_a_broken_card_is_not_silently_skipped(tmp_path: Path) -> None:
    folder = add_model(tmp_path, "tiny", "1")
    (folder / CARD_FILE).write_text('{"name": "tiny"}')  # no version
    with pytest.raises(ValueError, match="version"):
        resolve_model(tmp_path)
