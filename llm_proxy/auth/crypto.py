"""Secrets at rest: withering-token generation and HMAC, AES-GCM for upstream keys.

One master key (ENCRYPTION_KEY, 32 bytes) is stretched with HKDF into two independent
keys: the HMAC pepper for token hashes and the AES-256-GCM key for upstream API keys.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import secrets
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..domain_errors import ProxyError
from ..private_files import make_private_dirs

log = logging.getLogger(__name__)

TOKEN_PREFIX: Final = "wt-"
TOKEN_RANDOM_BYTES: Final = 32
ENVELOPE_PREFIX: Final = "v1:"
NONCE_BYTES: Final = 12
SHA256_BLOCK_BYTES: Final = 64
KEY_CHECK_PLAINTEXT: Final = "llm-proxy key check"


class DecryptionError(ProxyError, ValueError):
    """An envelope could not be decrypted with this key (wrong key or corrupt)."""


def generate_token() -> str:
    """A new withering token: `wt-` and 256 random bits in URL-safe base64."""
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_RANDOM_BYTES)


def token_hint(token: str) -> str:
    """The only part of a token ever shown after creation: its last 4 characters."""
    return token[-4:]


def mask_api_key(api_key: str) -> str:
    """`sk-...abcd`: enough to recognise a key, never enough to use it."""
    prefix = api_key.split("-", 1)[0] + "-" if "-" in api_key[:8] else ""
    return f"{prefix}...{api_key[-4:]}" if len(api_key) >= 12 else "..."


def _derive(master_key: bytes, purpose: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose)
    return hkdf.derive(master_key)


class TokenHasher:
    """HMAC-SHA256 of token values under a server-side pepper.

    The HMAC (RFC 2104) is computed from two SHA-256 states keyed once at start, so
    each request costs two small hash copies. `hmac.digest` gives the same bytes but,
    profiled under load, it was slower: with OpenSSL 3 it fetches the algorithm on
    every call and releases the GIL, so it waited for the GIL behind the database
    thread.
    """

    __slots__ = ("_inner", "_outer")

    def __init__(self, master_key: bytes) -> None:
        pepper = _derive(master_key, b"llm-proxy token pepper v1")
        block = pepper.ljust(SHA256_BLOCK_BYTES, b"\0")
        self._inner = hashlib.sha256(bytes(byte ^ 0x36 for byte in block))
        self._outer = hashlib.sha256(bytes(byte ^ 0x5C for byte in block))

    def hash(self, token: str) -> str:
        """Hex digest used as the lookup key; the token itself is never stored."""
        inner = self._inner.copy()
        inner.update(token.encode())
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()


class KeyCipher:
    """AES-256-GCM envelopes (`v1:` + base64(nonce ‖ ciphertext)) for upstream keys."""

    __slots__ = ("_aead",)

    def __init__(self, master_key: bytes) -> None:
        self._aead = AESGCM(_derive(master_key, b"llm-proxy upstream key v1"))

    def encrypt(self, plaintext: str) -> str:
        """Encrypt with a fresh random nonce."""
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext.encode(), None)
        return ENVELOPE_PREFIX + base64.b64encode(nonce + sealed).decode()

    def decrypt(self, envelope: str) -> str:
        """Decrypt, or raise `DecryptionError` (never return garbage)."""
        if not envelope.startswith(ENVELOPE_PREFIX):
            raise DecryptionError("not an llm-proxy key envelope")
        try:
            raw = base64.b64decode(envelope[len(ENVELOPE_PREFIX) :], validate=True)
            plain = self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], None)
        except (InvalidTag, ValueError) as exc:
            raise DecryptionError("wrong ENCRYPTION_KEY or corrupt value") from exc
        return plain.decode()


def load_or_create_key_file(path: Path) -> bytes:
    """Read a 32-byte key file, creating it (mode 0600) with a warning if missing."""
    if path.exists():
        raw = path.read_bytes().strip()
        key = base64.b64decode(raw)
        if len(key) != 32:
            raise ValueError(f"key file {path} does not hold base64 of 32 bytes")
        return key
    make_private_dirs(path.parent)
    key = os.urandom(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(base64.b64encode(key) + b"\n")
    log.warning(
        "ENCRYPTION_KEY is not set: generated a key file at %s (mode 0600). "
        "Back it up with the database; without it the stored upstream keys and "
        "tokens cannot be used.",
        path,
    )
    return key
