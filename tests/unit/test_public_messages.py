"""Our exceptions that reach API clients carry a client-safe text apart from the operator's one.

Real folders and a real scan store: each raise site is reached for real, and its ``public_message``
names no path while ``str(exc)`` still tells the operator where and what.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from brainscan.modelrepo import (
    NO_MODEL,
    UNREADABLE_REPOSITORY,
    ModelNotFound,
    public_reason,
    read_card,
    resolve_model,
)
from brainscan.storage import ScanStore, StorageUnavailable
from tests.support.models import add_model


def refusal(repo: Path, name: str = "", version: str = "") -> ModelNotFound:
    with pytest.raises(ModelNotFound) as caught:
        resolve_model(repo, name, version)
    return caught.value


def test_every_model_not_found_has_a_public_message_without_the_folder(tmp_path: Path) -> None:
    repo = tmp_path / "var" / "models"
    repo.mkdir(parents=True)
    cases = [(refusal(repo), NO_MODEL), (refusal(repo, "ghost", "7"), f"{NO_MODEL}: ghost/7 not installed")]
    add_model(repo, "a", "1")
    add_model(repo, "b", "1")
    cases += [
        (refusal(repo), f"{NO_MODEL}: several models are installed and none is promoted"),
        (
            refusal(repo, "", "1"),
            f"{NO_MODEL}: several models have version 1 and the server names none of them",
        ),
    ]
    with pytest.raises(ModelNotFound) as no_card:
        read_card(tmp_path / "empty")
    cases.append((no_card.value, NO_MODEL))
    for exc, public in cases:
        assert exc.public_message == public == public_reason(exc)
        assert str(tmp_path) not in exc.public_message
        assert str(tmp_path) in str(exc)  # the operator's text still says where
    # Survives a process boundary.
    copy = pickle.loads(pickle.dumps(cases[1][0]))
    assert (str(copy), copy.public_message) == (str(cases[1][0]), cases[1][0].public_message)


def test_unreadable_cards_have_a_fixed_public_reason(tmp_path: Path) -> None:
    add_model(tmp_path, "a", "1")
    (tmp_path / "a" / "1" / "model.json").write_text('{"name": "CARD-CONTENT"')
    with pytest.raises(ValueError) as caught:
        resolve_model(tmp_path)
    assert public_reason(caught.value) == UNREADABLE_REPOSITORY
    assert public_reason(PermissionError(13, "Permission denied", str(tmp_path))) == UNREADABLE_REPOSITORY


def test_storage_unavailable_tells_clients_nothing_of_the_root(tmp_path: Path) -> None:
    store = ScanStore(tmp_path / "storage")
    sha = store.put_bytes(b"scan bytes")
    store.scans_dir.rename(tmp_path / "elsewhere")
    with pytest.raises(StorageUnavailable) as caught:
        store.read(sha)
    assert str(store.root) in str(caught.value)
    assert caught.value.public_message == "scan storage unavailable, retry shortly"
