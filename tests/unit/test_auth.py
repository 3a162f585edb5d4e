"""API keys: random, hashed at rest, revocable, looked up by hash."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from brainscan.auth import authenticate, create_key, generate_key, hash_key, list_keys, revoke_key
from brainscan.db import ApiKey, Base, make_engine


@pytest.fixture
def session(tmp_path: Path):  # type: ignore[no-untyped-def]
    engine = make_engine(f"sqlite:///{tmp_path / 'auth.db'}")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        yield s
    engine.dispose()


def test_keys_are_long_random_and_distinct() -> None:
    keys = {generate_key() for _ in range(200)}
    assert len(keys) == 200
    for key in keys:
        assert key.startswith("bs_") and len(key) >= 3 + 43  # 32 random bytes, base64url
    assert hash_key("bs_x") == hash_key("bs_x") and len(hash_key("bs_x")) == 64


def test_only_the_hash_is_stored(session: Session) -> None:
    key, plaintext = create_key(session, "lab")
    session.commit()
    row = session.scalars(select(ApiKey)).one()
    assert row.key_hash == hash_key(plaintext) and plaintext not in (row.key_hash, row.prefix, row.name)
    assert row.prefix == plaintext[:11] and key.id == row.id


def test_authenticate_and_revoke(session: Session) -> None:
    key, plaintext = create_key(session, "lab")
    other, other_plaintext = create_key(session, "clinic")
    session.commit()
    assert authenticate(session, plaintext).id == key.id
    assert authenticate(session, other_plaintext).id == other.id
    for wrong in (None, "", plaintext + "x", plaintext[:-1], "bs_" + "A" * 43, "x" * 10_000):
        assert authenticate(session, wrong) is None

    assert [k.id for k in revoke_key(session, "lab")] == [key.id]
    session.commit()
    assert authenticate(session, plaintext) is None
    assert authenticate(session, other_plaintext) is not None
    assert revoke_key(session, "lab") == []  # already revoked
    assert [k.id for k in revoke_key(session, other.prefix)] == [other.id]
    assert [k.revoked_at is not None for k in list_keys(session)] == [True, True]


def test_key_names_are_checked(session: Session) -> None:
    for bad in ("", "   ", "x" * 201):
        with pytest.raises(ValueError):
            create_key(session, bad)
