"""The benchmark's baseline: a minimal pass-through aiohttp forwarder.

One pooled session, replaces Authorization, streams chunks, nothing else: no allowlist,
no token check, no rate limit, no breaker, no events. The proxy is measured against it.

    python benchmarks/baseline.py --port 9001 --upstream http://127.0.0.1:9000 --key sk-x
"""

from __future__ import annotations

import argparse

import aiohttp
import uvloop
from aiohttp import web

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "upgrade",
        "host",
        "te",
        "trailer",
    }
)


def create_forwarder(upstream: str, key: str) -> web.Application:
    """An app that forwards every request to `upstream` with our key."""
    session_key = web.AppKey("session", aiohttp.ClientSession)

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        app[session_key] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1000),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        yield
        await app[session_key].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP
        }
        headers["Authorization"] = f"Bearer {key}"
        body = await request.read()
        async with request.app[session_key].request(
            request.method, upstream + request.raw_path, headers=headers, data=body
        ) as upstream_response:
            out = {
                k: v
                for k, v in upstream_response.headers.items()
                if k.lower() not in HOP_BY_HOP
            }
            response = web.StreamResponse(status=upstream_response.status, headers=out)
            if upstream_response.content_length is not None:
                response.content_length = upstream_response.content_length
            await response.prepare(request)
            async for chunk in upstream_response.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    """Run the forwarder on uvloop until killed."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--key", default="sk-benchmark-key")
    args = parser.parse_args()
    web.run_app(
        create_forwarder(args.upstream.rstrip("/"), args.key),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
