"""The `model` field of a multipart form (audio uploads), read from its first bytes.

Runs off the request path: the relay keeps the first `FORM_HEAD_BYTES` of a
multipart body (where clients put the small fields, before the file), and the
instrumentation reads the model out of them for the call's event.
"""

from __future__ import annotations

import re
from typing import Final

FORM_HEAD_BYTES: Final = 16 * 1024
MAX_MODEL_CHARS: Final = 256
_BOUNDARY: Final = re.compile(r'boundary=(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)
_MODEL_PART: Final = re.compile(rb'(?:^|[;\s])name="?model"?(?:;|\s|$)', re.IGNORECASE)


def form_boundary(content_type: str | None) -> bytes | None:
    """The boundary of a `multipart/form-data` Content-Type, or None."""
    if not content_type or not content_type.lower().startswith("multipart/form-data"):
        return None
    match = _BOUNDARY.search(content_type)
    if match is None:
        return None
    return (match.group(1) or match.group(2)).encode("latin-1", "replace")


def model_from_form(head: bytes, boundary: bytes) -> str | None:
    """The value of the form's `model` field when it lies whole within `head`."""
    delimiter = b"--" + boundary
    parts = head.split(delimiter)
    for part in parts[1:-1]:  # the last piece may be cut: it has no closing delimiter
        headers, found, value = part.partition(b"\r\n\r\n")
        if found and _is_model_part(headers):
            text = value.removesuffix(b"\r\n").decode("utf-8", "replace")
            return text.strip()[:MAX_MODEL_CHARS] or None
    return None


def _is_model_part(headers: bytes) -> bool:
    for line in headers.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-disposition" and _MODEL_PART.search(value):
            return b"filename" not in value.lower()
    return False
