"""`llm-proxy bench`: the load loop against real servers, the report maths, `--mock`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from click.testing import CliRunner
from pytest_aiohttp import AiohttpServer

from llm_proxy.cli import main
from llm_proxy.devtools.bench import (
    BenchError,
    BenchOptions,
    ProgressLine,
    default_body,
    progress_printer,
    run_bench,
)
from llm_proxy.devtools.bench_report import (
    BenchReport,
    Samples,
    added_latency,
    percentile,
    render_text,
    summarize,
    target_report,
)

from ..support import MANAGEMENT_TOKEN, proxy_token


class Ticks:
    """A progress receiver that records what it was told."""

    def __init__(self) -> None:
        self.updates: list[tuple[int, int | None]] = []
        self.ended: tuple[int, int | None] | None = None

    def update(self, done: int, total: int | None, elapsed_s: float) -> None:
        self.updates.append((done, total))

    def end(self, done: int, total: int | None, elapsed_s: float) -> None:
        self.ended = (done, total)

    def message(self, text: str) -> None:
        raise AssertionError(f"unexpected warning: {text}")


def test_percentile_uses_nearest_rank() -> None:
    ordered = list(range(1, 101))
    assert [percentile(ordered, q) for q in (0, 50, 90, 99, 100)] == [
        1,
        50,
        90,
        99,
        100,
    ]
    assert percentile([7], 99) == 7
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summarize_reports_milliseconds_and_none_without_samples() -> None:
    assert summarize([]) is None
    latency = summarize([3_000_000, 1_000_000, 2_000_000])
    assert latency is not None
    assert (latency.min, latency.p50, latency.max, latency.mean) == (1.0, 2.0, 3.0, 2.0)


def test_target_report_counts_errors_as_failures() -> None:
    samples = Samples(latencies_ns=[1_000_000], ok=1, failed=1)
    samples.statuses.update({200: 1, 503: 1})
    samples.errors["timeout"] += 2
    report = target_report("http://x", samples, elapsed_s=0.5, stream=False)
    assert (report.requests, report.ok, report.failed) == (4, 1, 3)
    assert (report.non_2xx, report.label) == (1, "target")
    assert report.statuses == {"200": 1, "503": 1} and report.errors == {"timeout": 2}
    assert report.throughput_rps == 2.0 and report.ttfb is None
    assert target_report("http://x", Samples(), 0.0, True).throughput_rps == 0.0


def test_added_latency_is_target_minus_baseline() -> None:
    slow, fast = summarize([5_000_000]), summarize([2_000_000])
    assert added_latency(slow, fast)["p99"] == 3.0
    assert added_latency(None, fast) == {}


def test_render_text_shows_every_part() -> None:
    samples = Samples(latencies_ns=[2_000_000], ttfb_ns=[1_000_000], chunk_gaps_ns=[10])
    samples.ok = 1
    samples.statuses[200] = 1
    samples.errors["connect"] = 1
    target = target_report("http://a", samples, 1.0, stream=True, label="proxy")
    direct = target_report("http://b", samples, 1.0, stream=True, label="direct")
    report = BenchReport("POST", "/v1/x", 2, True, 1.0, [target, direct], {"p50": 0.5})
    text = render_text(report)
    for part in (
        "proxy http://a",
        "direct http://b",
        "requests    2  ok 1  non-2xx 0  errors 1",
        "added latency (proxy minus direct, 1 and 1 samples):",
        "statuses    200: 1",
        "errors      connect: 1",
        "total       min 2.000",
        "ttfb",
        "chunk gap",
        "p50 +0.500 ms",
    ):
        assert part in text
    assert report.to_json()["targets"][0]["latency"]["p50"] == 2.0


def test_bench_options_reject_nonsense() -> None:
    with pytest.raises(BenchError):
        BenchOptions("http://x", concurrency=0)
    with pytest.raises(BenchError):
        BenchOptions("http://x", duration_s=0)


def test_progress_printer_draws_a_bar() -> None:
    lines: list[str] = []
    progress_printer(None, lines.append).update(5, 10, 0.5)
    progress_printer(2.0, lines.append).update(3, None, 1.0)
    progress_printer(None, lines.append).update(0, None, 0.0)
    assert lines[0].startswith("\r[" + "#" * 15 + "." * 15 + "] 5/10 10 req/s")
    assert "#" * 15 in lines[1] and "] 3 3 req/s" in lines[1]
    assert "0 req/s" in lines[2]


def test_progress_line_ends_before_anything_else_is_written() -> None:
    out: list[str] = []
    line = progress_printer(None, out.append)
    line.message("before any bar")
    line.update(1, 4, 0.1)
    line.message("warning: in the middle")
    line.update(2, 4, 0.2)
    line.end(4, 4, 0.4)
    text = "".join(out)
    assert text.startswith("before any bar\n\r[")
    assert "req/s 0.1 s\nwarning: in the middle\n\r[" in text
    assert text.endswith("] 4/4 10 req/s 0.4 s\n")
    assert isinstance(line, ProgressLine)


async def test_run_bench_ends_its_progress_line(
    proxy: TestClient[Any, Any], upstream: TestServer
) -> None:
    _, token = await proxy_token(proxy)
    out: list[str] = []
    await run_bench(
        BenchOptions(
            str(proxy.make_url("")), token=token, body=default_body(False), requests=3
        ),
        progress_printer(None, out.append),
    )
    text = "".join(out)
    assert text.endswith(" s\n")
    assert text.count("\n") == 1 and "\r[" + "#" * 30 + "] 3/3" in text


async def test_run_bench_keeps_refusals_apart_and_warns_about_the_token_limit(
    proxy: TestClient[Any, Any], upstream: TestServer
) -> None:
    _, token = await proxy_token(proxy, rate_limit_per_hour=5)
    said: list[str] = []
    report = await run_bench(
        BenchOptions(
            str(proxy.make_url("")),
            token=token,
            body=default_body(False),
            requests=8,
            concurrency=1,
        ),
        warn=said.append,
    )
    (target,) = report.targets
    assert (target.ok, target.non_2xx, target.failed) == (5, 3, 3)
    assert target.statuses == {"200": 5, "429": 3}
    assert target.latency is not None and target.latency.count == 5
    assert target.throughput_rps == 5 / report.elapsed_s
    assert (target.rate_limit_per_hour, target.rate_limit_remaining) == (5, 4)
    assert len(said) == 1 and said[0] == report.warnings[0]
    assert "allows 5 requests per hour" in said[0] and "sends 8" in said[0]
    assert report.warnings[1].startswith("3 answers were not 2xx (429: 3 rate limited)")
    text = render_text(report)
    assert "ok 5  non-2xx 3  errors 0" in text
    assert "rate limit  5 per hour, 4 left after the first answer" in text
    assert "latency     min" in text and "(5 samples, 2xx only)" in text
    assert text.endswith(report.warnings[-1])


async def test_run_bench_does_not_warn_when_the_limit_covers_the_run(
    proxy: TestClient[Any, Any], upstream: TestServer
) -> None:
    _, token = await proxy_token(proxy, rate_limit_per_hour=50)
    report = await run_bench(
        BenchOptions(
            str(proxy.make_url("")), token=token, body=default_body(False), requests=6
        ),
        warn=Ticks().message,
    )
    assert report.warnings == [] and report.targets[0].rate_limit_per_hour == 50


def test_default_body_is_a_chat_request() -> None:
    body = json.loads(default_body(stream=True))
    assert body["stream"] is True and body["messages"][0]["role"] == "user"
    assert "stream" not in json.loads(default_body(stream=False))


async def test_run_bench_through_the_proxy_counts_every_request(
    proxy: TestClient[Any, Any], upstream: TestServer
) -> None:
    _, token = await proxy_token(proxy)
    base = str(proxy.make_url("")).rstrip("/")
    ticks = Ticks()
    report = await run_bench(
        BenchOptions(
            base,
            token=token,
            body=default_body(False),
            requests=12,
            concurrency=3,
            warmup=2,
        ),
        progress=ticks,
    )
    (target,) = report.targets
    assert (target.ok, target.failed, target.statuses) == (12, 0, {"200": 12})
    assert target.latency is not None and target.latency.count == 12
    assert target.latency.min <= target.latency.p50 <= target.latency.max
    assert ticks.ended == (12, 12) and report.added_latency_ms is None


async def test_run_bench_streams_and_compares_with_the_upstream(
    proxy: TestClient[Any, Any], upstream: TestServer
) -> None:
    _, token = await proxy_token(proxy)
    report = await run_bench(
        BenchOptions(
            str(proxy.make_url("")),
            token=token,
            body=default_body(True),
            requests=6,
            concurrency=2,
            stream=True,
            compare_url=str(upstream.make_url("")),
            headers=(("x-fake-behaviour", "slow-stream=0.001"),),
        )
    )
    through, direct = report.targets
    assert through.ok == direct.ok == 6
    assert (through.label, direct.label) == ("proxy", "baseline")
    assert report.warnings == []  # the upstream's own limit headers are not ours
    assert through.ttfb is not None and direct.chunk_gap is not None
    assert direct.chunk_gap.min >= 0.5  # the fake paused ~1 ms between events
    assert report.added_latency_ms is not None and "p99" in report.added_latency_ms


async def test_run_bench_counts_statuses_and_error_kinds(
    proxy: TestClient[Any, Any], aiohttp_server: AiohttpServer, unused_tcp_port: int
) -> None:
    rejected = await run_bench(
        BenchOptions(
            str(proxy.make_url("")),
            token="nope",
            requests=3,
            concurrency=1,
            body=default_body(False),
        )
    )
    assert rejected.targets[0].statuses == {"401": 3}
    assert rejected.targets[0].latency is None

    refused = await run_bench(
        BenchOptions(f"http://127.0.0.1:{unused_tcp_port}", requests=2, concurrency=1)
    )
    assert refused.targets[0].errors == {"connect": 2}

    async def stall(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"partial")
        if request.path == "/drop":
            assert request.transport is not None
            request.transport.close()
            return response
        await request.app[GATE].wait()
        return response

    app = web.Application()
    app[GATE] = __import__("asyncio").Event()
    app.router.add_get("/{tail:.*}", stall)
    server = await aiohttp_server(app)
    timed_out = await run_bench(
        BenchOptions(
            str(server.make_url("")),
            endpoint="/slow",
            method="GET",
            requests=1,
            concurrency=1,
            timeout_s=0.1,
        )
    )
    assert timed_out.targets[0].errors == {"timeout": 1}
    dropped = await run_bench(
        BenchOptions(
            str(server.make_url("")),
            endpoint="/drop",
            method="GET",
            requests=1,
            concurrency=1,
            headers=(("Content-Length", "100"),),
        )
    )
    assert sum(dropped.targets[0].errors.values()) == 1
    app[GATE].set()


async def test_run_bench_names_other_client_errors_by_type() -> None:
    import asyncio

    async def garbage(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        report = await run_bench(
            BenchOptions(
                f"http://127.0.0.1:{port}", method="GET", requests=1, concurrency=1
            )
        )
    assert report.targets[0].errors == {"ClientResponseError": 1}


GATE = web.AppKey("gate", __import__("asyncio").Event)


async def test_run_bench_with_a_duration_stops_at_the_deadline(
    upstream: TestServer,
) -> None:
    ticks = Ticks()
    report = await run_bench(
        BenchOptions(
            str(upstream.make_url("")),
            endpoint="/v1/models",
            method="GET",
            duration_s=0.3,
            concurrency=2,
        ),
        progress=ticks,
    )
    assert report.targets[0].ok > 0 and 0.3 <= report.elapsed_s < 1.5
    assert len(ticks.updates) >= 1 and ticks.ended == (report.targets[0].ok, None)


def test_run_bench_rejects_a_relative_url() -> None:
    import asyncio

    with pytest.raises(BenchError, match="not an absolute URL"):
        asyncio.run(run_bench(BenchOptions("/relative", requests=1)))


def test_bench_command_mock_json_smoke(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["bench", "--mock", "--requests", "20", "--concurrency", "2", "--json"]
    )
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(result.stdout)
    (target,) = report["targets"]
    assert target["ok"] == 20 and target["statuses"] == {"200": 20}
    assert target["latency"]["p99"] >= target["latency"]["p50"] > 0


def test_bench_command_mock_compare_direct_stream_text() -> None:
    result = CliRunner().invoke(
        main,
        [
            "bench",
            "--mock",
            "--compare-direct",
            "--stream",
            "-r",
            "10",
            "-c",
            "2",
            "--warmup",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output + result.stderr
    assert result.output.count("proxy http://127.0.0.1:") == 1
    assert result.output.count("direct http://127.0.0.1:") == 1
    assert "added latency (proxy minus direct, 10 and 10 samples)" in result.output
    assert "ttfb" in result.output and "(10 samples, 2xx only)" in result.output


def test_benchmark_as_the_seed_writes_it(proxy_and_token: tuple[str, str]) -> None:
    url, token = proxy_and_token
    result = CliRunner().invoke(
        main,
        [
            "benchmark",
            f"--base-url={url}",
            "--endpoint=/v1/chat/completions",
            f"--token={token}",
            "--requests=20",
            "--concurrency=10",
        ],
    )
    assert result.exit_code == 0, result.output + result.stderr
    assert "target " + url in result.output
    assert "requests    20  ok 20  non-2xx 0  errors 0" in result.output
    assert "benchmark" not in CliRunner().invoke(main, ["--help"]).output


def test_bench_command_against_a_given_url_with_a_body_file(tmp_path: Path) -> None:
    body = tmp_path / "body.json"
    body.write_bytes(default_body(False))
    port = _closed_port()
    result = CliRunner().invoke(
        main,
        [
            "bench",
            "--base-url",
            f"http://127.0.0.1:{port}",
            "--body-file",
            str(body),
            "-r",
            "2",
            "-c",
            "1",
            "--token",
            "t",
            "--json",
        ],
    )
    assert result.exit_code == 0
    assert json.loads(result.stdout)["targets"][0]["errors"] == {"connect": 2}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--body", "{}", "--body-file", __file__], "not both"),
        (["--compare-direct"], "needs --mock"),
    ],
)
def test_bench_command_usage_errors(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["bench", *args])
    assert result.exit_code == 2 and message in result.output


def test_bench_command_get_without_body(upstream_url: Callable[[], str]) -> None:
    result = CliRunner().invoke(
        main,
        [
            "bench",
            "--base-url",
            upstream_url(),
            "--endpoint",
            "/v1/models",
            "--method",
            "get",
            "-r",
            "3",
            "-c",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "GET /v1/models" in result.output and "statuses    200: 3" in result.output


@pytest.fixture
def proxy_and_token(tmp_path: Path) -> Any:
    """A proxy in front of the fake upstream in a thread, and a token for it."""
    import asyncio
    import threading

    from llm_proxy.app import create_app
    from llm_proxy.config import Settings
    from llm_proxy.devtools.fake_upstream import start_fake_upstream
    from llm_proxy.management.client import ManageClient

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[list[web.AppRunner], str, str]:
        fake_runner, fake_url = await start_fake_upstream()
        settings = Settings.from_env(
            {
                "MANAGEMENT_TOKEN": MANAGEMENT_TOKEN,
                "DATABASE_URL": f"sqlite:///{tmp_path / 'bench.db'}",
                "OPENAI_API_URL": str(fake_url).rstrip("/"),
            }
        )
        runner = web.AppRunner(create_app(settings), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        async with ManageClient(url, MANAGEMENT_TOKEN) as api:
            project = await api.create_project(name="seed", api_key="sk-seed-0123456")
            token = await api.create_token(
                project_id=project["project_id"], duration_minutes=10
            )
        return [runner, fake_runner], url, token["token"]

    runners, url, token = asyncio.run_coroutine_threadsafe(start(), loop).result(15)
    yield url, token

    async def stop() -> None:
        for runner in runners:
            await runner.cleanup()

    asyncio.run_coroutine_threadsafe(stop(), loop).result(15)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


@pytest.fixture
def upstream_url() -> Any:
    """A fake upstream in a thread, for commands that run their own event loop."""
    import asyncio
    import threading

    from llm_proxy.devtools.fake_upstream import start_fake_upstream

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner, url = asyncio.run_coroutine_threadsafe(start_fake_upstream(), loop).result(
        10
    )
    yield lambda: str(url)
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
