"""`llm-proxy serve --workers 2` as real processes on a real port, with real Redis.

The load comes from "lanes": each lane holds one keep-alive connection at a time, asks
`/health` on it first (so it knows which worker PID serves that connection), then
sends proxied calls on it back to back. A call is retried only when its attempt got no
response at all (the connection died under it), and then on a new connection; a
response of any other status than 200 is a failure and is never retried.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from llm_proxy.config import Settings
from llm_proxy.server import free_port, process_alive, read_pid_file
from llm_proxy.workers import run_fleet

from .hostile.rawhttp import open_raw, read_response, request_bytes
from .support import MANAGEMENT_TOKEN, REDIS_URL, UPSTREAM_KEY, require_redis
from .test_server_process import COMMAND, clean_environ, cli, wait_gone

pytestmark = pytest.mark.redis

LANES = 6
BODY = orjson.dumps(
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
)


@pytest.fixture
async def stream_key() -> AsyncIterator[str]:
    """A Redis stream of the test's own, deleted afterwards."""
    await require_redis()
    key = f"test-workers-{uuid.uuid4().hex}"
    yield key
    client = Redis.from_url(REDIS_URL)
    try:
        await client.delete(key)
    finally:
        await client.aclose()


def fleet_environ(tmp_path: Path, port: int, upstream: str, key: str) -> dict[str, str]:
    return clean_environ(
        MANAGEMENT_TOKEN=MANAGEMENT_TOKEN,
        LISTEN_ADDR=f"127.0.0.1:{port}",
        OPENAI_API_URL=upstream,
        DATABASE_URL=f"sqlite:///{tmp_path / 'proxy.db'}",
        REDIS_URL=REDIS_URL,
        EVENT_STREAM_KEY=key,
        EVENT_FLUSH_INTERVAL="0.1",
        FILE_EVENT_LOG=str(tmp_path / "events.jsonl"),
        EVENT_SPOOL_PATH=str(tmp_path / "spool.jsonl"),
        DEAD_LETTER_DIR=str(tmp_path),
        TOKEN_REFRESH_INTERVAL="0.2",
        DEFAULT_RATE_LIMIT_PER_HOUR="1000000",
        USAGE_ESTIMATION="off",
        SHUTDOWN_GRACE_PERIOD="3",
        LOG_FORMAT="text",
        LOG_LEVEL="info",
    )


@dataclass
class Load:
    """What the lanes saw: served calls per worker PID, attempts without answer."""

    token: str
    port: int
    served: dict[int, list[float]] = field(default_factory=dict)
    unanswered: list[tuple[int, float]] = field(default_factory=list)
    bad: list[tuple[int, int]] = field(default_factory=list)
    health_pids: dict[int, int] = field(default_factory=dict)  # pid -> index
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def call(self) -> bytes:
        headers = [
            ("Authorization", f"Bearer {self.token}"),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(BODY))),
        ]
        return request_bytes("POST", "/v1/chat/completions", headers, BODY)

    async def connect(
        self, prefer: int | None = None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
        """A new connection and the PID of the worker that accepted it; with `prefer`,
        a few tries to land on that worker index (the kernel picks the worker)."""
        tries = 0
        while True:
            try:
                reader, writer = await open_raw("127.0.0.1", self.port, 5.0)
                writer.write(request_bytes("GET", "/health"))
                answer = await read_response(reader, 5.0)
                worker = json.loads(answer.body)["worker"]
                self.health_pids[worker["pid"]] = worker["index"]
                tries += 1
                if prefer in (None, worker["index"]) or tries >= 50:
                    return reader, writer, worker["pid"]
                writer.close()
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                await asyncio.sleep(0.05)  # a worker died before answering /health

    async def lane(self, prefer: int | None = None) -> None:
        reader, writer, pid = await self.connect(prefer)
        try:
            while not self.stop.is_set():
                try:
                    writer.write(self.call())
                    answer = await read_response(reader, 10.0)
                except (OSError, asyncio.IncompleteReadError, TimeoutError):
                    # No response at all: the worker died under this call. Retry it
                    # on a new connection (the loop sends it again).
                    self.unanswered.append((pid, time.monotonic()))
                    writer.close()
                    reader, writer, pid = await self.connect()
                    continue
                if answer.status != 200:
                    self.bad.append((pid, answer.status))
                else:
                    self.served.setdefault(pid, []).append(time.monotonic())
        finally:
            writer.close()

    def count(self) -> int:
        return sum(len(times) for times in self.served.values())


async def mint_token(base: str) -> str:
    auth = {"Authorization": f"Bearer {MANAGEMENT_TOKEN}"}
    async with aiohttp.ClientSession() as session:
        project = {"name": "fleet", "openai_api_key": UPSTREAM_KEY}
        async with session.post(
            f"{base}/manage/projects", json=project, headers=auth
        ) as r:
            project_id = (await r.json())["project_id"]
        token = {"project_id": project_id, "duration_minutes": 10}
        async with session.post(f"{base}/manage/tokens", json=token, headers=auth) as r:
            return str((await r.json())["token"])


async def wait_for_workers(port: int, count: int, timeout_s: float = 20.0) -> set[int]:
    """Poll /health on new connections until `count` different workers answered."""
    pids: set[int] = set()
    async with asyncio.timeout(timeout_s), aiohttp.ClientSession() as session:
        while len(pids) < count:
            try:
                async with session.get(
                    f"http://127.0.0.1:{port}/health", headers={"Connection": "close"}
                ) as response:
                    pids.add((await response.json())["worker"]["pid"])
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
    return pids


async def warm_up(load: Load, workers: int) -> None:
    """Until the token works on `workers` different workers (each reloads it)."""
    ready: set[int] = set()
    async with asyncio.timeout(15):
        while len(ready) < workers:
            reader, writer, pid = await load.connect()
            writer.write(load.call())
            if (await read_response(reader, 5.0)).status == 200:
                ready.add(pid)
                load.served.setdefault(pid, []).append(time.monotonic())
            writer.close()
            await asyncio.sleep(0.05)


async def until(condition: Callable[[], bool], timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            if condition():
                return
            await asyncio.sleep(0.05)


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()]


async def stop_fleet(process: asyncio.subprocess.Process) -> int:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(20):
                await process.wait()
        except TimeoutError:  # pragma: no cover - only when the drain hangs
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode


async def test_two_workers_share_one_port_and_their_events_arrive_whole_in_one_log(
    tmp_path: Path, proxy_env: dict[str, str], stream_key: str
) -> None:
    """`serve -d --workers 2`: both workers serve; every call's event is one whole
    line of the one JSONL file; `server stop` stops the whole fleet."""
    port = free_port()
    env = fleet_environ(tmp_path, port, proxy_env["OPENAI_API_URL"], stream_key)
    started = await asyncio.to_thread(
        cli, tmp_path, env, "serve", "-d", "--workers", "2"
    )
    assert started.returncode == 0, started.stdout + started.stderr
    parent = read_pid_file(tmp_path / "llm-proxy.pid")
    assert parent is not None
    try:
        pids = await wait_for_workers(port, 2)
        assert sorted(pids) == sorted(children(parent))
        load = Load(await mint_token(f"http://127.0.0.1:{port}"), port)
        await warm_up(load, 2)
        lanes = [asyncio.create_task(load.lane(i % 2)) for i in range(LANES)]
        await until(lambda: len(load.served) == 2 and load.count() >= 300, 20)
        load.stop.set()
        await asyncio.gather(*lanes)
        assert load.bad == [] and load.unanswered == []
        assert set(load.served) == pids  # both workers served calls
        stopped = await asyncio.to_thread(cli, tmp_path, env, "server", "stop")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert wait_gone(parent) and not any(process_alive(p) for p in pids)
    finally:
        if process_alive(parent):
            os.kill(parent, signal.SIGKILL)
    lines = (tmp_path / "events.jsonl").read_bytes().splitlines()
    events = [orjson.loads(line) for line in lines]  # every line parses: none torn
    calls = [e for e in events if e["path"] == "/v1/chat/completions"]
    assert len({e["event_id"] for e in calls}) == len(calls)  # none twice
    # An event id starts with 16 hex digits drawn once per process: the writer.
    per_writer: dict[str, int] = {}
    for event in calls:
        if event["status_code"] == 200:
            writer = event["event_id"][:16]
            per_writer[writer] = per_writer.get(writer, 0) + 1
    served = sorted(len(times) for times in load.served.values())
    assert sorted(per_writer.values()) == served  # every 200 of each worker: none lost
    print(
        f"\nserved {sum(served)} calls over one port, per worker {served}; "
        f"{len(lines)} whole lines in the one events.jsonl"
    )


async def test_a_worker_killed_under_load_is_replaced_and_the_other_loses_nothing(
    tmp_path: Path, proxy_env: dict[str, str], stream_key: str
) -> None:
    """Acceptance 3 of issue #14: SIGKILL one worker under a steady load.

    Asserted: every response is a 200; attempts without any response happened only
    on connections to the killed worker, at most one per lane; the surviving worker
    served calls while its peer was down and none of its calls failed; the parent
    started a replacement (new PID, same index) that serves.
    """
    port = free_port()
    env = fleet_environ(tmp_path, port, proxy_env["OPENAI_API_URL"], stream_key)
    with (tmp_path / "serve.log").open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            *COMMAND,
            "serve",
            "--workers",
            "2",
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        await wait_for_workers(port, 2)
        load = Load(await mint_token(f"http://127.0.0.1:{port}"), port)
        await warm_up(load, 2)
        lanes = [asyncio.create_task(load.lane(i % 2)) for i in range(LANES)]
        await until(lambda: len(load.served) == 2, 10)
        await asyncio.sleep(1.0)
        victim = next(p for p, i in load.health_pids.items() if i == 0)
        survivor = next(p for p, i in load.health_pids.items() if i == 1)
        before = load.count()
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        async with asyncio.timeout(20):
            while not (set(load.health_pids) - {victim, survivor}):
                await asyncio.sleep(0.05)  # probe on new connections for the new one
                _, writer, _ = await load.connect()
                writer.close()
        replaced_at = time.monotonic()
        (replacement,) = set(load.health_pids) - {victim, survivor}
        await asyncio.sleep(1.0)
        load.stop.set()
        await asyncio.gather(*lanes)
        assert process.returncode is None  # the parent kept running
    finally:
        code = await stop_fleet(process)
    assert code == 0
    assert load.bad == []
    assert {pid for pid, _ in load.unanswered} <= {victim}
    assert len(load.unanswered) <= LANES
    gap = [t for t in load.served[survivor] if killed_at <= t <= replaced_at]
    assert gap, "the surviving worker served nothing while its peer was down"
    assert load.health_pids[replacement] == 0
    print(
        f"\nserved {load.count()} calls ({before} before the kill); "
        f"{len(load.unanswered)} attempts without response on the killed worker, "
        f"retried; the survivor served {len(gap)} calls in the "
        f"{replaced_at - killed_at:.2f} s until the replacement answered"
    )


async def test_a_worker_that_keeps_crashing_at_start_makes_the_parent_exit_1(
    tmp_path: Path, stream_key: str
) -> None:
    port = free_port()
    env = fleet_environ(tmp_path, port, "http://127.0.0.1:9", stream_key)
    broken = tmp_path / "allowlist.yaml"
    broken.write_text("apis: [unclosed\n")
    env["API_CONFIG_PATH"] = str(broken)
    started = time.monotonic()
    result = await asyncio.to_thread(cli, tmp_path, env, "serve", "--workers", "2")
    took = time.monotonic() - started
    assert result.returncode == 1
    assert "before serving or within 5 s of it, 3 times in a row" in result.stderr
    assert str(broken) in result.stderr  # the workers' own error is in the log
    assert took < 30
    print(f"\ngave up after {took:.1f} s")


def test_sigterm_to_the_supervisor_drains_the_workers_and_returns_0(
    tmp_path: Path, stream_key: str
) -> None:
    """`run_fleet` in this process (main thread, so its signal handlers work)."""
    port = free_port()
    env = fleet_environ(tmp_path, port, "http://127.0.0.1:9", stream_key)
    settings = Settings.from_env({**env, "WORKERS": "2"})
    pid_file = tmp_path / "fleet.pid"
    seen: list[int] = []
    watcher = threading.Thread(target=_terminate_once_serving, args=(port, seen))
    watcher.start()
    code = run_fleet(settings, env, pid_file)
    watcher.join()
    assert code == 0
    assert len(set(seen)) == 2  # both workers answered before the stop
    assert not any(process_alive(pid) for pid in seen)
    assert not pid_file.exists()


def _terminate_once_serving(port: int, seen: list[int]) -> None:
    """Wait for two workers to answer, then SIGTERM this process (the supervisor)."""
    deadline = time.monotonic() + 20
    while len(set(seen)) < 2 and time.monotonic() < deadline:
        try:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/health", headers={"Connection": "close"}
            )
            with urllib.request.urlopen(request, timeout=2) as response:
                seen.append(json.loads(response.read())["worker"]["pid"])
        except OSError:
            time.sleep(0.1)
    os.kill(os.getpid(), signal.SIGTERM)
