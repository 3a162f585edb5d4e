"""API keys: random, shown once, stored only as SHA-256 hashes, revocable.

A key is ``bs_`` + 43 URL-safe characters (256 random bits). Because keys are high-entropy, a plain
SHA-256 is the right hash (no salt or slow KDF needed: there is nothing to brute-force), and lookup by
hash means the database never compares a secret byte by byte. Keys are never logged; operators see
the ``prefix`` (the first characters), which is not enough to authenticate.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import UTC, datetime

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from brainscan.db import ApiKey

KEY_PREFIX = "bs_"
PREFIX_CHARS = 11  # "bs_" + 8 characters: enough to tell keys apart in `brainscan keys list`
MAX_KEY_CHARS = 200


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def create_key(session: Session, name: str) -> tuple[ApiKey, str]:
    """A new key named ``name``; returns the row and the plaintext, which is never stored."""
    name = name.strip()
    if not name or len(name) > 200:
        raise ValueError("a key name needs 1 to 200 characters")
    plaintext = generate_key()
    key = ApiKey(
        name=name, prefix=plaintext[:PREFIX_CHARS], key_hash=hash_key(plaintext), created_at=datetime.now(UTC)
    )
    session.add(key)
    session.flush()
    return key, plaintext


def revoke_key(session: Session, prefix_or_name: str) -> list[ApiKey]:
    """Revoke every active key with this name or prefix; returns those revoked (may be empty)."""
    target = prefix_or_name.strip()
    if not target:
        return []
    keys = list(
        session.scalars(
            select(ApiKey).where(
                ApiKey.revoked_at.is_(None), or_(ApiKey.name == target, ApiKey.prefix == target)
            )
        )
    )
    now = datetime.now(UTC)
    for key in keys:
        key.revoked_at = now
    session.flush()
    return keys


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)))


def authenticate(session: Session, plaintext: str | None) -> ApiKey | None:
    """The active key matching ``plaintext``, or None."""
    if not plaintext or len(plaintext) > MAX_KEY_CHARS:
        return None
    digest = hash_key(plaintext)
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None)))
    if key is None or not hmac.compare_digest(key.key_hash, digest):
        return None
    return key
