"""`openai chat`, `bench`, `dispatcher` and the hidden `fake-upstream` helper."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ..logs import configure_logging
from .base import (
    echo_json,
    fail,
    load_settings,
    main,
    proxy_url,
    run,
)

BASE_URL_HELP = (
    "Base URL of the proxy (default: from LISTEN_ADDR, else localhost:8080)."
)
TOKEN_HELP = (
    "Withering token; prefer the LLM_PROXY_TOKEN variable: flags are visible in the "
    "process list."
)

# -- openai chat ---------------------------------------------------------------------


@main.group()
def openai() -> None:
    """Talk to the OpenAI API through the proxy."""


@openai.command("chat")
@click.option(
    "--token",
    envvar="LLM_PROXY_TOKEN",
    help=TOKEN_HELP,
)
@click.option("--model", default="gpt-4o-mini", show_default=True)
@click.option("--system", help="A system message for the conversation.")
@click.option("--no-stream", is_flag=True, help="Wait for the whole answer.")
@click.option("--base-url", help=BASE_URL_HELP)
def openai_chat(
    token: str | None,
    model: str,
    system: str | None,
    no_stream: bool,
    base_url: str | None,
) -> None:
    """Chat through the proxy: one line per message, /exit or end of input to stop."""
    from .chat import ChatError, ChatOptions, chat

    if not token:
        fail("no token: pass --token or set LLM_PROXY_TOKEN", 2)
    options = ChatOptions(
        proxy_url(base_url), token, model, system, stream=not no_stream
    )
    prompt = "> " if sys.stdin.isatty() else ""
    try:
        run(chat(options, prompt=prompt))
    except ChatError as exc:
        fail(str(exc))


# -- bench ---------------------------------------------------------------------------


@main.command()
@click.option("--base-url", help=BASE_URL_HELP)
@click.option("--endpoint", default="/v1/chat/completions", show_default=True)
@click.option(
    "--token",
    envvar="LLM_PROXY_TOKEN",
    help=TOKEN_HELP,
)
@click.option(
    "-r",
    "--requests",
    type=click.IntRange(1),
    default=1000,
    show_default=True,
    help="Requests per target.",
)
@click.option(
    "-c", "--concurrency", type=click.IntRange(1), default=10, show_default=True
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    help="Run for this many seconds instead of a count.",
)
@click.option("--method", default="POST", show_default=True)
@click.option("--body", help="Request body (default: a small chat completion).")
@click.option(
    "--body-file", type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option("--stream", is_flag=True, help="Ask for SSE; report TTFB and chunk gaps.")
@click.option(
    "--warmup",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Unmeasured requests per target first.",
)
@click.option("--timeout", type=float, default=30.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--compare-url", help="A second base URL loaded alternately (baseline).")
@click.option(
    "--mock",
    is_flag=True,
    help="Start a fake upstream and a proxy on loopback and bench those.",
)
@click.option(
    "--compare-direct",
    is_flag=True,
    help="With --mock: compare against the fake upstream directly.",
)
def bench(
    base_url: str | None,
    endpoint: str,
    token: str | None,
    requests: int,
    concurrency: int,
    duration: float | None,
    method: str,
    body: str | None,
    body_file: Path | None,
    stream: bool,
    warmup: int,
    timeout: float,
    as_json: bool,
    compare_url: str | None,
    mock: bool,
    compare_direct: bool,
) -> None:
    """Measure latency and throughput of the proxy (or any OpenAI-like URL).

    Also answers to `llm-proxy benchmark`.
    """
    from ..devtools.bench import BenchOptions, default_body

    if body is not None and body_file is not None:
        raise click.UsageError("give --body or --body-file, not both")
    if compare_direct and not mock:
        raise click.UsageError("--compare-direct needs --mock")
    payload = body.encode() if body is not None else None
    if body_file is not None:
        payload = body_file.read_bytes()
    if payload is None and method.upper() in {"POST", "PUT", "PATCH"}:
        payload = default_body(stream)
    options = BenchOptions(
        base_url=proxy_url(base_url),
        endpoint=endpoint,
        token=token,
        method=method.upper(),
        body=payload,
        requests=requests,
        concurrency=concurrency,
        duration_s=duration,
        stream=stream,
        warmup=warmup,
        timeout_s=timeout,
        compare_url=compare_url,
    )
    report = run(_bench(options, mock, compare_direct, as_json))
    if as_json:
        echo_json(report.to_json())
    else:
        from ..devtools.bench_report import render_text

        click.echo(render_text(report))


async def _bench(options: Any, mock: bool, compare_direct: bool, as_json: bool) -> Any:
    from dataclasses import replace

    from ..devtools.bench import progress_printer, run_bench
    from ..devtools.bench_mock import mock_targets

    progress = None
    warn = _warn
    if not as_json and sys.stderr.isatty():  # pragma: no cover - needs a terminal
        progress = progress_printer(options.duration_s, _write_err)
        warn = _warn_below(progress)
    if not mock:
        return await run_bench(options, progress, warn)
    async with mock_targets() as targets:
        options = replace(
            options,
            base_url=targets.proxy_url,
            token=targets.token,
            compare_url=targets.upstream_url if compare_direct else options.compare_url,
            compare_label="direct" if compare_direct else options.compare_label,
        )
        return await run_bench(options, progress, warn)


def _warn(text: str) -> None:
    click.secho(f"warning: {text}", fg="yellow", err=True)


def _warn_below(progress: Any) -> Any:  # pragma: no cover - needs a terminal
    return lambda text: progress.message(click.style(f"warning: {text}", fg="yellow"))


def _write_err(text: str) -> None:  # pragma: no cover - needs a terminal
    sys.stderr.write(text)
    sys.stderr.flush()


# -- hidden helpers ------------------------------------------------------------------


@main.command("fake-upstream", hidden=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8090, show_default=True)
@click.option("--chunk-delay", type=float, default=0.0, show_default=True)
def fake_upstream(host: str, port: int, chunk_delay: float) -> None:
    """Serve the fake OpenAI upstream (tests, bench --mock, demos)."""
    from ..devtools.fake_upstream import run_fake_upstream

    run_fake_upstream(host, port, chunk_delay)  # pragma: no cover - child process


# -- event dispatcher ---------------------------------------------------------------


@main.command()
@click.option(
    "--service",
    type=click.Choice(["file", "helicone", "lunary", "http"]),
    required=True,
    help="Where to deliver events.",
)
@click.option(
    "--endpoint",
    help="file: the JSONL path; http: the URL (LOGGING_URL); helicone/lunary: "
    "override the API base URL.",
)
@click.option(
    "--api-key",
    envvar="DISPATCHER_API_KEY",
    show_envvar=True,
    help="Backend credential; prefer the DISPATCHER_API_KEY variable.",
)
@click.option("--batch-size", type=click.IntRange(min=1), help="Events per batch.")
@click.option(
    "--flush-interval",
    type=click.FloatRange(min=0.01),
    help="Seconds before a partial batch is sent.",
)
@click.option(
    "--consumer-name",
    help="Stable name in the Redis consumer group (default: host-pid); a restarted "
    "dispatcher with the same name resumes its unacknowledged batch at once.",
)
def dispatcher(
    service: str,
    endpoint: str | None,
    api_key: str | None,
    batch_size: int | None,
    flush_interval: float | None,
    consumer_name: str | None,
) -> None:
    """Deliver events from the Redis bus to one backend until SIGTERM (then drain).

    Each service reads its own consumer group, so several services fan out and several
    processes of one service share the load. Needs LLM_PROXY_EVENT_BUS=redis on the
    proxy and REDIS_URL on both.
    """
    from ..dispatchers import run_dispatcher

    settings = load_settings(needs_management_token=False)
    configure_logging(settings.log_level, settings.log_format)
    run(
        run_dispatcher(
            settings,
            service,
            endpoint=endpoint,
            api_key=api_key,
            batch_size=batch_size,
            flush_interval_s=flush_interval,
            consumer_name=consumer_name,
        )
    )
