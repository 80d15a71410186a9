"""Raw-socket HTTP/1.1 for hostile-traffic tests: exact bytes out, exact bytes back."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

DEFAULT_TIMEOUT_S = 10.0


@dataclass
class RawResponse:
    """One HTTP/1.1 response as read off the socket, body de-chunked."""

    status: int
    reason: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    raw_body: bytes = b""  # as framed on the wire (chunk sizes included)

    def header(self, name: str) -> str | None:
        """The first value of header `name` (any case), or None."""
        lowered = name.lower()
        return next((v for k, v in self.headers if k.lower() == lowered), None)


async def open_raw(
    host: str, port: int, timeout_s: float = DEFAULT_TIMEOUT_S
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain TCP connection to `host:port`."""
    return await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)


async def read_response(
    reader: asyncio.StreamReader,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    *,
    head: bool = False,
) -> RawResponse:
    """Read one response (status line, headers, body by its framing) within `timeout_s`."""
    async with asyncio.timeout(timeout_s):
        status_line = (await reader.readuntil(b"\r\n")).decode("latin-1").rstrip()
        _, status, reason = (status_line.split(" ", 2) + [""])[:3]
        response = RawResponse(int(status), reason)
        while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.decode("latin-1").partition(":")
            response.headers.append((name.strip(), value.strip()))
        if head or response.status in (204, 304) or 100 <= response.status < 200:
            return response
        if (response.header("transfer-encoding") or "").lower() == "chunked":
            await _read_chunked(reader, response)
        elif (length := response.header("content-length")) is not None:
            response.body = response.raw_body = await reader.readexactly(int(length))
        else:
            response.body = response.raw_body = await reader.read()
        return response


async def _read_chunked(reader: asyncio.StreamReader, response: RawResponse) -> None:
    raw, body = bytearray(), bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        raw += size_line
        size = int(size_line.split(b";")[0].strip(), 16)
        data = await reader.readexactly(size + 2)
        raw += data
        body += data[:-2]
        if size == 0:
            while data != b"\r\n":  # trailers, then the final CRLF
                data = await reader.readuntil(b"\r\n")
                raw += data
            break
    response.raw_body, response.body = bytes(raw), bytes(body)


async def exchange(
    host: str, port: int, data: bytes, timeout_s: float = DEFAULT_TIMEOUT_S
) -> RawResponse:
    """Send `data` as is on a fresh connection and read one response."""
    reader, writer = await open_raw(host, port, timeout_s)
    try:
        writer.write(data)
        await writer.drain()
        return await read_response(reader, timeout_s)
    finally:
        writer.close()


def request_bytes(
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    *,
    host: str = "127.0.0.1",
) -> bytes:
    """An HTTP/1.1 request exactly as given: no header is added but Host."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
