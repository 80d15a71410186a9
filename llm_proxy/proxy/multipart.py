"""The small fields of a multipart form (audio uploads), read from its first bytes.

The relay keeps the first `FORM_HEAD_BYTES` of a multipart body (where clients put
the small fields, before the file). The instrumentation reads the model out of them
for the call's event, off the request path; a token whose policy limits models or
streaming has them read on the request path (`relay._PolicedPeek`).
"""

from __future__ import annotations

import re
from typing import Final

FORM_HEAD_BYTES: Final = 16 * 1024
MAX_MODEL_CHARS: Final = 256
_BOUNDARY: Final = re.compile(r'boundary=(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)
_FIELD_PART: Final = {
    name: re.compile(rb'(?:^|[;\s])name="?' + name + rb'"?(?:;|\s|$)', re.IGNORECASE)
    for name in (b"model", b"stream")
}


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
    return form_field(head, boundary, b"model")


def form_field(head: bytes, boundary: bytes, name: bytes) -> str | None:
    """The value of the text field `name` ("model" or "stream") when it lies whole
    within `head`."""
    delimiter = b"--" + boundary
    parts = head.split(delimiter)
    pattern = _FIELD_PART[name]
    for part in parts[1:-1]:  # the last piece may be cut: it has no closing delimiter
        headers, found, value = part.partition(b"\r\n\r\n")
        if found and _is_field_part(headers, pattern):
            text = value.removesuffix(b"\r\n").decode("utf-8", "replace")
            return text.strip()[:MAX_MODEL_CHARS] or None
    return None


def _is_field_part(headers: bytes, pattern: re.Pattern[bytes]) -> bool:
    for line in headers.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-disposition" and pattern.search(value):
            return b"filename" not in value.lower()
    return False
