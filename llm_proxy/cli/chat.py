"""`llm-proxy openai chat`: an interactive chat through the proxy, streamed as it arrives.

It talks plain HTTP to `/v1/chat/completions` with aiohttp (the OpenAI SDK is only a
test dependency), keeps the conversation, and prints `choices[0].delta.content` of each
SSE `data:` line as soon as it is read. It knows nothing about click.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import orjson

from ..domain_errors import ProxyError
from ..management.client import error_message

EXIT_COMMANDS: Final = frozenset({"/exit", "/quit"})
DONE: Final = b"[DONE]"

ReadLine = Callable[[], Awaitable[str | None]]
Write = Callable[[str], None]
Message = dict[str, str]


class ChatError(ProxyError):
    """The proxy answered an error (message from its OpenAI-shaped body)."""


@dataclass(frozen=True, slots=True)
class ChatOptions:
    """Where to send the chat and how."""

    base_url: str
    token: str
    model: str
    system: str | None = None
    stream: bool = True
    timeout_s: float = 300.0


def delta_content(line: bytes) -> str | None:
    """The text of one SSE line (`data: {...}`), None for anything without text."""
    if not line.startswith(b"data:"):
        return None
    data = line[5:].strip()
    if not data or data == DONE:
        return None
    try:
        choices = orjson.loads(data).get("choices") or []
        content = choices[0].get("delta", {}).get("content")
    except (orjson.JSONDecodeError, AttributeError, IndexError):
        return None
    return content if isinstance(content, str) else None


def message_content(body: bytes) -> str:
    """`choices[0].message.content` of a whole (non-streamed) answer."""
    answer: Any = orjson.loads(body)
    return str(answer["choices"][0]["message"]["content"] or "")


async def ask(
    session: aiohttp.ClientSession,
    options: ChatOptions,
    messages: list[Message],
    write: Write,
) -> str:
    """Send the conversation; write the answer as it arrives; return its full text."""
    payload: dict[str, Any] = {"model": options.model, "messages": messages}
    if options.stream:
        payload["stream"] = True
    url = options.base_url.rstrip("/") + "/v1/chat/completions"
    async with session.post(url, data=orjson.dumps(payload)) as response:
        if response.status >= 400:
            error = error_message(response.status, await response.read())
            raise ChatError(str(error))
        if not options.stream:
            text = message_content(await response.read())
            write(text)
            return text
        parts: list[str] = []
        async for line in response.content:
            piece = delta_content(line)
            if piece:
                parts.append(piece)
                write(piece)
        return "".join(parts)


async def read_stdin_line() -> str | None:
    """One line of standard input without blocking the loop; None at end of input."""
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    return line or None


async def chat(
    options: ChatOptions,
    read_line: ReadLine = read_stdin_line,
    write: Write | None = None,
    prompt: str = "",
) -> int:
    """Read user lines until end of input or `/exit`; return the number of turns."""
    out = write or _write_stdout
    messages: list[Message] = []
    if options.system:
        messages.append({"role": "system", "content": options.system})
    headers = {
        "Authorization": f"Bearer {options.token}",
        "Content-Type": "application/json",
    }
    timeout = aiohttp.ClientTimeout(total=options.timeout_s)
    turns = 0
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        while True:
            out(prompt)
            line = await read_line()
            if line is None or line.strip() in EXIT_COMMANDS:
                return turns
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line.rstrip("\n")})
            answer = await ask(session, options, messages, out)
            out("\n")
            messages.append({"role": "assistant", "content": answer})
            turns += 1


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
