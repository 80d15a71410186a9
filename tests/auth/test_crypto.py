"""Token hashing and upstream-key encryption."""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path

import pytest

from llm_proxy.auth.crypto import (
    DecryptionError,
    KeyCipher,
    TokenHasher,
    _derive,
    generate_token,
    load_or_create_key_file,
    mask_api_key,
    token_hint,
)


def test_token_hash_is_standard_hmac_sha256_under_the_derived_pepper() -> None:
    master = os.urandom(32)
    token = generate_token()
    pepper = _derive(master, b"llm-proxy token pepper v1")
    expected = hmac.new(pepper, token.encode(), hashlib.sha256).hexdigest()
    hasher = TokenHasher(master)
    assert hasher.hash(token) == expected
    assert hasher.hash(token) == expected, "the keyed states are reused, not consumed"
    assert TokenHasher(os.urandom(32)).hash(token) != expected


def test_tokens_are_long_random_and_hinted_by_their_last_four() -> None:
    tokens = {generate_token() for _ in range(100)}
    assert len(tokens) == 100
    token = tokens.pop()
    assert token.startswith("wt-") and len(token) == 46
    assert token_hint(token) == token[-4:]


def test_key_cipher_round_trips_and_refuses_other_keys() -> None:
    master = os.urandom(32)
    envelope = KeyCipher(master).encrypt("sk-secret")
    assert envelope.startswith("v1:") and "sk-secret" not in envelope
    assert KeyCipher(master).decrypt(envelope) == "sk-secret"
    with pytest.raises(DecryptionError):
        KeyCipher(os.urandom(32)).decrypt(envelope)
    with pytest.raises(DecryptionError):
        KeyCipher(master).decrypt("plain")
    with pytest.raises(DecryptionError):
        KeyCipher(master).decrypt("v1:not base64!")


@pytest.mark.parametrize(
    ("key", "shown"),
    [
        ("sk-proj-abcdefghijklmnop", "sk-...mnop"),
        ("abcdefghijklmnop", "...mnop"),
        ("short", "..."),
    ],
)
def test_mask_api_key_shows_at_most_prefix_and_last_four(key: str, shown: str) -> None:
    assert mask_api_key(key) == shown


def test_key_file_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "db.key"
    key = load_or_create_key_file(path)
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key_file(path) == key
    path.write_text("dG9vIHNob3J0\n")
    with pytest.raises(ValueError, match="32 bytes"):
        load_or_create_key_file(path)
