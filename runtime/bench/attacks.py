"""Attacks one tenant can try on the others, run against a live daemon: `python -m
kvrt.runtime.bench.attacks --url URL --attacker-key KEY --victim-key KEY`

    python -m kvrt.runtime.bench.attacks --url http://127.0.0.1:8400 \\
        --attacker-key AKEY --victim-key VKEY [--only NAME ...] [--json]

Each attack is tried by the attacker while /health is polled (every 20 ms) and, where it
matters, while the victim makes an ordinary call; a row says what the daemon answered, how
long it took, the worst /health latency meanwhile and what the victim got. The attacker's
graphs and runs are deleted afterwards. The rows are what issue 20's table of attacks is made
of: run this against two builds of the daemon to compare them.

    attack            what the attacker does
    ----------------  ---------------------------------------------------------------------
    top_p_extreme     a call with top_p 1e-50 (0 in float32) beside a victim's call
    giant_prompt      a chat body of 4 MiB of text (--giant-prompt-bytes)
    near_limit_prompt a chat prompt of as many characters as the context could hold
    giant_round       a round of 2,000 agents (--round-agents), 1 token each
    round_run_ended   a round whose run is ended (DELETE) while its calls run
    deep_json         a chat body whose tool's parameters nest 100,000 arrays deep
    non_utf8_auth     an Authorization header with bytes that are not UTF-8
    oversized_header  a header of 64 KiB
    bad_request_line  a request line that is not HTTP
    slowloris         request headers sent one byte a second (up to 40 s)
    metrics_peek      GET /metrics with a tenant's key
    run_hoarding      runs started until refused (at most 5,000); then the victim starts one
    graph_hoarding    graphs declared until refused (at most 5,000); the listing's size
    queue_flood       3,000 calls at once (--flood); the victim's call meanwhile
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from urllib.parse import urlparse

import aiohttp

from kvrt.runtime.bench.tenant_isolation import tenant_session
from kvrt.runtime.config import parse_size

_TIMEOUT = aiohttp.ClientTimeout(total=600)
_HEALTH_EVERY_S = 0.02
_MAX_CREATED = 5000


@dataclass(slots=True)
class AttackResult:
    attack: str
    answer: str  # the attacker's status(es), with the error code where there is one
    seconds: float  # until the daemon answered the attack
    health_max_ms: float  # the worst /health answer meanwhile
    victim: str = ""  # what the victim's call got meanwhile ("" where the attack has none)
    note: str = ""


@dataclass(slots=True)
class _Context:
    url: str
    attacker: aiohttp.ClientSession
    victim: aiohttp.ClientSession
    giant_prompt_bytes: int
    round_agents: int
    flood: int
    graphs: list[str] = field(default_factory=list)  # the attacker's, deleted at the end
    runs: list[str] = field(default_factory=list)


async def run_attacks(url: str, attacker_key: str | None, victim_key: str | None,
                      only: list[str] | None = None, giant_prompt_bytes: int = 4 * 1024**2,
                      round_agents: int = 2000, flood: int = 3000) -> list[AttackResult]:
    results = []
    async with (tenant_session(url, attacker_key, _TIMEOUT) as attacker,
                tenant_session(url, victim_key, _TIMEOUT) as victim):
        ctx = _Context(url, attacker, victim, giant_prompt_bytes, round_agents, flood)
        try:
            for name, attack in ATTACKS.items():
                if only and name not in only:
                    continue
                results.append(await _measured(ctx, name, attack))
        finally:
            await _clean_up(ctx)
    return results


async def _measured(ctx: _Context, name: str,
                    attack: Callable[[_Context], Awaitable[tuple[str, str, str]]]
                    ) -> AttackResult:
    polls: list[float] = []
    stop = asyncio.Event()
    poller = asyncio.create_task(_poll_health(ctx.victim, polls, stop))
    started = time.monotonic()
    try:
        answer, victim, note = await attack(ctx)
    except Exception as exc:  # noqa: BLE001 - a row says what broke, the others still run
        answer, victim, note = f"client error: {type(exc).__name__}: {exc}"[:200], "", ""
    seconds = time.monotonic() - started
    stop.set()
    await poller
    return AttackResult(name, answer, round(seconds, 3), round(max(polls, default=0) * 1000, 1),
                        victim, note)


async def _poll_health(session: aiohttp.ClientSession, polls: list[float],
                       stop: asyncio.Event) -> None:
    while not stop.is_set():
        started = time.monotonic()
        try:
            async with session.get("/health") as resp:
                await resp.read()
        except aiohttp.ClientError:
            pass
        polls.append(time.monotonic() - started)
        try:
            await asyncio.wait_for(stop.wait(), _HEALTH_EVERY_S)
        except TimeoutError:
            pass


async def _post(session: aiohttp.ClientSession, path: str, body: object = None, *,
                data: bytes | None = None) -> tuple[int, dict]:
    payload = data if data is not None else json.dumps(body).encode()
    async with session.post(path, data=payload,
                            headers={"Content-Type": "application/json"}) as resp:
        raw = await resp.read()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, {"text": raw[:200].decode(errors="replace")}


def _said(status: int, reply: dict) -> str:
    error = reply.get("error") if isinstance(reply.get("error"), dict) else None
    if error is not None:
        return f"{status} {error.get('code') or error.get('type')}"
    if "text" in reply:
        return f"{status} (not JSON: {reply['text'][:40]!r})"
    return str(status)


def _chat(content: str, max_tokens: int = 4, **extra: object) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            **extra}


async def _victim_call(ctx: _Context, delay_s: float = 0.0) -> str:
    await asyncio.sleep(delay_s)
    started = time.monotonic()
    status, reply = await _post(ctx.victim, "/v1/chat/completions", _chat("Hello there", 8))
    return f"{_said(status, reply)} in {time.monotonic() - started:.2f} s"


async def _graph_and_run(ctx: _Context, agents: int) -> str:
    status, graph = await _post(ctx.attacker, "/v1/graphs", {
        "name": "attack", "agents": [{"name": f"a{i}"} for i in range(agents)]})
    if status != 201:
        raise RuntimeError(f"cannot declare the attack's graph: {_said(status, graph)}")
    ctx.graphs.append(graph["id"])
    status, run = await _post(ctx.attacker, "/v1/runs", {"graph_id": graph["id"]})
    if status != 201:
        raise RuntimeError(f"cannot start the attack's run: {_said(status, run)}")
    ctx.runs.append(run["id"])
    return run["id"]


def _round(agents: int, max_tokens: int = 1) -> dict:
    return {"agents": {f"a{i}": {"messages": [{"role": "user", "content": f"Agent {i}."}]}
                       for i in range(agents)},
            "shared": [{"role": "user", "content": "Shared news of the round."}],
            "max_tokens": max_tokens}


async def top_p_extreme(ctx: _Context) -> tuple[str, str, str]:
    attack = _post(ctx.attacker, "/v1/chat/completions", _chat("Hi", 8, top_p=1e-50))
    (status, reply), victim = await asyncio.gather(attack, _victim_call(ctx))
    return _said(status, reply), victim, ""


async def giant_prompt(ctx: _Context) -> tuple[str, str, str]:
    text = "word " * (ctx.giant_prompt_bytes // 5)
    status, reply = await _post(ctx.attacker, "/v1/chat/completions", _chat(text, 1))
    return _said(status, reply), "", f"{len(text) / 1024**2:.1f} MiB of text"


async def near_limit_prompt(ctx: _Context) -> tuple[str, str, str]:
    """A prompt the daemon must tokenize to judge: just under the characters any tokenization
    of the context could spell (the bound a too-long text's 400 names, else 16 characters a
    token), so it is refused only after the tokenizer has run."""
    async with ctx.attacker.get("/v1/models") as resp:
        context = (await resp.json())["data"][0].get("max_model_len") or 8192
    status, reply = await _post(ctx.attacker, "/v1/chat/completions",
                                _chat("abcd " * (context * 100), 1))
    bound = re.search(r"\((\d+) characters at most\)", str(reply))
    chars = int(bound.group(1)) - 1000 if bound else context * 16
    text = "abcd " * (chars // 5)
    status, reply = await _post(ctx.attacker, "/v1/chat/completions", _chat(text, 1))
    return _said(status, reply), "", f"{len(text)} characters"


async def giant_round(ctx: _Context) -> tuple[str, str, str]:
    run = await _graph_and_run(ctx, ctx.round_agents)
    victim = asyncio.create_task(_victim_call(ctx, delay_s=0.2))
    status, reply = await _post(ctx.attacker, f"/v1/runs/{run}/rounds", _round(ctx.round_agents))
    return _said(status, reply), await victim, f"{ctx.round_agents} agents"


async def round_run_ended(ctx: _Context) -> tuple[str, str, str]:
    run = await _graph_and_run(ctx, 8)
    # 200 tokens each, whatever the model samples: still running when the run ends
    round_call = asyncio.create_task(_post(ctx.attacker, f"/v1/runs/{run}/rounds",
                                           {**_round(8, max_tokens=200), "ignore_eos": True}))
    await asyncio.sleep(0.3)
    async with ctx.attacker.delete(f"/v1/runs/{run}") as resp:
        await resp.read()
    status, reply = await round_call
    return _said(status, reply), "", "the run ended 0.3 s into the round"


async def deep_json(ctx: _Context) -> tuple[str, str, str]:
    depth = 100_000
    body = (b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", '
            b'"function": {"name": "f", "parameters": {"a": ' + b"[" * depth + b"]" * depth
            + b"}}}]}")
    status, reply = await _post(ctx.attacker, "/v1/chat/completions", data=body)
    return _said(status, reply), "", f"{depth} levels"


async def _raw(ctx: _Context, request: bytes, wait_s: float = 10.0) -> bytes:
    """Sends `request` as is on a fresh connection; returns what came back."""
    host, port = _host_port(ctx.url)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), wait_s)
    finally:
        writer.close()


def _host_port(url: str) -> tuple[str, int]:
    parsed = urlparse(url)
    return parsed.hostname or "127.0.0.1", parsed.port or 80


def _raw_status(reply: bytes) -> str:
    head, _, body = reply.partition(b"\r\n\r\n")
    line = head.split(b"\r\n", 1)[0].decode(errors="replace")
    kind = "JSON" if body.lstrip().startswith(b"{") else "not JSON"
    return f"{line.removeprefix('HTTP/1.1 ')} ({kind})" if line else "connection closed"


async def non_utf8_auth(ctx: _Context) -> tuple[str, str, str]:
    body = json.dumps(_chat("Hi")).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe"
               b"key\r\nContent-Type: application/json\r\nContent-Length: "
               + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
    return _raw_status(await _raw(ctx, request)), "", ""


async def oversized_header(ctx: _Context) -> tuple[str, str, str]:
    request = (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536
               + b"\r\nConnection: close\r\n\r\n")
    return _raw_status(await _raw(ctx, request)), "", "64 KiB header"


async def bad_request_line(ctx: _Context) -> tuple[str, str, str]:
    return _raw_status(await _raw(ctx, b"HELLO WORLD\r\n\r\n")), "", ""


async def slowloris(ctx: _Context) -> tuple[str, str, str]:
    """Header bytes one a second: how long until the daemon hangs up (up to 40 s)."""
    host, port = _host_port(ctx.url)
    reader, writer = await asyncio.open_connection(host, port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    started = time.monotonic()
    request = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
    closed = "still open after 40 s"
    try:
        for byte in request:
            if time.monotonic() - started > 40:
                break
            writer.write(bytes([byte]))
            await writer.drain()
            try:
                if await asyncio.wait_for(reader.read(1024), 1.0) == b"":
                    closed = f"closed after {time.monotonic() - started:.0f} s"
                    break
            except TimeoutError:
                continue
            closed = f"answered after {time.monotonic() - started:.0f} s"
            break
    except ConnectionError:
        closed = f"closed after {time.monotonic() - started:.0f} s"
    finally:
        writer.close()
    return closed, "", "one byte a second"


async def metrics_peek(ctx: _Context) -> tuple[str, str, str]:
    async with ctx.attacker.get("/metrics") as resp:
        text = await resp.text()
    global_figures = "kvrt:" in text and resp.status == 200
    return str(resp.status), "", ("every tenant's figures shown" if global_figures
                                  else "no figures")


async def run_hoarding(ctx: _Context) -> tuple[str, str, str]:
    status, graph = await _post(ctx.attacker, "/v1/graphs",
                                {"name": "hoard", "agents": [{"name": "a"}]})
    if status != 201:
        return _said(status, graph), "", "no graph to start runs of"
    ctx.graphs.append(graph["id"])
    count, answer = await _until_refused(ctx, "/v1/runs", {"graph_id": graph["id"]}, ctx.runs)
    status, reply = await _post(ctx.victim, "/v1/graphs", {"name": "v", "agents": [
        {"name": "a"}]})
    victim = _said(status, reply)
    if status == 201:
        status, run = await _post(ctx.victim, "/v1/runs", {"graph_id": reply["id"]})
        victim = f"run: {_said(status, run)}"
        if status == 201:
            async with ctx.victim.delete(f"/v1/runs/{run['id']}") as resp:
                await resp.read()
        async with ctx.victim.delete(f"/v1/graphs/{reply['id']}") as resp:
            await resp.read()
    return answer, victim, f"{count} runs started"


async def graph_hoarding(ctx: _Context) -> tuple[str, str, str]:
    count, answer = await _until_refused(
        ctx, "/v1/graphs", {"name": "hoard", "agents": [{"name": f"a{i}"} for i in range(64)]},
        ctx.graphs)
    async with ctx.attacker.get("/v1/graphs") as resp:
        listing = await resp.read()
    return answer, "", f"{count} graphs declared; GET /v1/graphs: {len(listing) / 1024:.0f} KiB"


async def _until_refused(ctx: _Context, path: str, body: dict, into: list[str]
                         ) -> tuple[int, str]:
    for count in range(_MAX_CREATED):
        status, reply = await _post(ctx.attacker, path, body)
        if status not in (200, 201):
            return count, _said(status, reply)
        into.append(reply["id"])
    return _MAX_CREATED, f"never refused ({_MAX_CREATED} made)"


async def queue_flood(ctx: _Context) -> tuple[str, str, str]:
    flood = [_post(ctx.attacker, "/v1/chat/completions", _chat(f"Flood {i}.", 4))
             for i in range(ctx.flood)]
    victim = asyncio.create_task(_victim_call(ctx, delay_s=0.5))
    answers = await asyncio.gather(*flood)
    counts: dict[str, int] = {}
    for status, reply in answers:
        said = _said(status, reply)
        counts[said] = counts.get(said, 0) + 1
    answer = ", ".join(f"{said}: {n}" for said, n in sorted(counts.items()))
    return answer, await victim, f"{ctx.flood} calls at once"


ATTACKS: dict[str, Callable[[_Context], Awaitable[tuple[str, str, str]]]] = {
    "top_p_extreme": top_p_extreme, "giant_prompt": giant_prompt,
    "near_limit_prompt": near_limit_prompt, "giant_round": giant_round,
    "round_run_ended": round_run_ended, "deep_json": deep_json, "non_utf8_auth": non_utf8_auth,
    "oversized_header": oversized_header, "bad_request_line": bad_request_line,
    "slowloris": slowloris, "metrics_peek": metrics_peek, "run_hoarding": run_hoarding,
    "graph_hoarding": graph_hoarding, "queue_flood": queue_flood,
}


async def _clean_up(ctx: _Context) -> None:
    for path in [f"/v1/runs/{r}" for r in ctx.runs] + [f"/v1/graphs/{g}" for g in ctx.graphs]:
        try:
            async with ctx.attacker.delete(path) as resp:
                await resp.read()
        except aiohttp.ClientError:
            pass


def format_table(results: list[AttackResult]) -> str:
    lines = ["| attack | answer | s | /health max ms | victim | note |",
             "|---|---|---:|---:|---|---|"]
    lines += [f"| {r.attack} | {r.answer} | {r.seconds:.2f} | {r.health_max_ms:.0f} | "
              f"{r.victim} | {r.note} |" for r in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvrt.runtime.bench.attacks",
                                description="Attacks of one tenant on the others, against a "
                                            "live kvrt daemon.")
    p.add_argument("--url", default="http://127.0.0.1:8400")
    p.add_argument("--attacker-key", default=None)
    p.add_argument("--victim-key", default=None)
    p.add_argument("--only", nargs="*", choices=sorted(ATTACKS), default=None)
    p.add_argument("--giant-prompt-bytes", type=parse_size, default=4 * 1024**2)
    p.add_argument("--round-agents", type=int, default=2000)
    p.add_argument("--flood", type=int, default=3000)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    results = asyncio.run(run_attacks(args.url.rstrip("/"), args.attacker_key, args.victim_key,
                                      args.only, args.giant_prompt_bytes, args.round_agents,
                                      args.flood))
    print(json.dumps([asdict(r) for r in results], indent=2) if args.json
          else format_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
