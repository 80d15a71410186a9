"""A benchmark upstream that streams 20 chat-completion SSE events, 1 ms apart.

Like OpenAI, it ends with a usage chunk when the request asked for one
(`stream_options.include_usage`), then `data: [DONE]`.

python benchmarks/sse_upstream.py --port 9002
"""

from __future__ import annotations

import argparse
import asyncio
import json

import uvloop
from aiohttp import web

EVENTS = 20
GAP_S = 0.001
_CHUNK = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1,'
    b'"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"tok "},'
    b'"finish_reason":null}]}\n\n'
)
_USAGE = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1,'
    b'"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":9,'
    b'"completion_tokens":20,"total_tokens":29}}\n\n'
)


async def stream(request: web.Request) -> web.StreamResponse:
    """20 events, the usage chunk when asked for, then [DONE]."""
    body = json.loads(await request.read())
    if not body.get("stream"):
        raise web.HTTPBadRequest(text="this upstream only streams")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for _ in range(EVENTS):
        await response.write(_CHUNK)
        await asyncio.sleep(GAP_S)
    if (body.get("stream_options") or {}).get("include_usage"):
        await response.write(_USAGE)
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def main() -> None:
    """Serve on uvloop until killed."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", stream)
    web.run_app(
        app,
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
