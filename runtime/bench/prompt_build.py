"""How long the server takes to build a call's engine request from its messages.

    PYTHONSAFEPATH=1 python -m kvrt.runtime.bench.prompt_build [--messages 1000]
        [--agents 1000] [--repeats 5] [--out bench-out/prompt_build.json]

On the real default model's tokenizer and chat template (SmolLM2), through the functions the
routes use (server/call_context.py, server/model_calls.py), up to the GenerateRequest that
admission hands the engine (validation and queueing are not timed):
- chat: one chat call of `--messages` short messages, with every message a segment (a call of
  a run whose graph declares approximate reuse) and with none marked (a call of no run);
- round: the calls of one All-Gather round of `--agents` agents, each with two private
  messages, the same three shared messages and one instruction; the contexts (each agent's
  priority over a graph of that many agents) timed apart from the prompts.
Each figure is the median over `--repeats` builds. `digest` hashes the requests' prompt ids and
segments, so two builds (before and after a change) can be shown to agree.
A benchmark, not a test: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from kvrt.runtime.config import ControlConfig
from kvrt.runtime.engine.protocol import GenerateRequest
from kvrt.runtime.graph.control_plane import ControlPlane
from kvrt.runtime.model.checkpoint import load_checkpoint
from kvrt.runtime.model.tokenizer import Tokenizer
from kvrt.runtime.server.call_context import call_context, round_contexts
from kvrt.runtime.server.model_calls import chat_call, round_agent_call
from kvrt.sdk.protocol.control import AgentSpec, GraphSpec
from kvrt.sdk.protocol.openai_api import ChatCompletionRequest, KvrtOptions
from kvrt.sdk.protocol.rounds import RoundRequest

TENANT = "bench"


@dataclass(frozen=True, slots=True)
class Model:
    """The served model as building a call reads it (openai_requests.ServedModel)."""

    model_name: str
    max_model_len: int
    tokenizer: Tokenizer


WORDS = ["ok", "yes", "no", "sure", "done", "next", "wait", "go"]


def chat_body(messages: int) -> dict[str, Any]:
    """A system message, then user and assistant turns of one word each: a turn is then 7
    tokens, so 1,000 of them fit SmolLM2's 8,192."""
    turns = [{"role": "system", "content": "You are a terse note taker."}]
    turns += [{"role": "user" if i % 2 == 0 else "assistant", "content": WORDS[i % len(WORDS)]}
              for i in range(messages - 1)]
    return {"messages": turns, "max_tokens": 1}


def round_body(agents: int) -> dict[str, Any]:
    shared = [{"role": "user", "content": f"Agent {i} said: the bridge is closed, take the "
               f"ferry at {i + 8} o'clock."} for i in range(3)]
    own = {f"agent{i}": {"messages": [
        {"role": "system", "content": f"You are agent {i}, a careful town planner."},
        {"role": "user", "content": f"Yesterday you inspected street {i}."}]}
        for i in range(agents)}
    return {"shared": shared, "agents": own, "max_tokens": 1,
            "instruction": [{"role": "user", "content": "Say what you do next."}]}


def digest(requests: list[GenerateRequest]) -> str:
    """Of the prompts a build made: their ids and segments."""
    hashed = hashlib.sha256()
    for r in requests:
        hashed.update(json.dumps([r.prompt_token_ids, r.segments]).encode())
    return hashed.hexdigest()[:16]


def median_ms(build: Callable[[], object], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        build()
        samples.append((time.perf_counter() - started) * 1e3)
    return statistics.median(samples)


def time_chat(model: Model, messages: int, repeats: int) -> dict[str, Any]:
    control = ControlPlane(ControlConfig())
    graph = control.create_graph(GraphSpec(name="notes", reuse="approximate",
                                           agents=[AgentSpec(name="taker")]), TENANT)
    run = control.start_run(graph.id, tenant=TENANT)
    body = msgspec.convert(chat_body(messages), ChatCompletionRequest)

    def build(attributed: bool) -> GenerateRequest:
        options = KvrtOptions(run=run.id, agent="taker") if attributed else None
        context = call_context(control, options, {}, TENANT)
        call = chat_call(body, None, context, model, tenant=TENANT)
        return call.request(None)

    marked, unmarked = build(True), build(False)
    assert len(marked.segments) == messages and not unmarked.segments
    return {"messages": messages, "prompt_tokens": len(marked.prompt_token_ids),
            "every_message_a_segment_ms": median_ms(lambda: build(True), repeats),
            "no_segments_ms": median_ms(lambda: build(False), repeats),
            "digest": digest([marked, unmarked])}


def time_round(model: Model, agents: int, repeats: int) -> dict[str, Any]:
    control = ControlPlane(ControlConfig())
    graph = control.create_graph(GraphSpec(name="town", agents=[
        AgentSpec(name=f"agent{i}", expected_output_tokens=16 + i % 50)
        for i in range(agents)]), TENANT)
    run = control.start_run(graph.id, tenant=TENANT)
    body = msgspec.convert(round_body(agents), RoundRequest)

    def build() -> list[GenerateRequest]:
        contexts = round_contexts(run, body.agents)
        return [round_agent_call(body, name, context, model, tenant=TENANT).request(None)
                for name, context in zip(body.agents, contexts)]

    requests = build()
    assert all(len(r.segments) == len(body.shared) for r in requests)
    return {"agents": agents,
            "prompt_tokens": sum(len(r.prompt_token_ids) for r in requests),
            "contexts_ms": median_ms(lambda: round_contexts(run, body.agents), repeats),
            "round_ms": median_ms(build, repeats), "digest": digest(requests)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    checkpoint = load_checkpoint(None)
    model = Model("SmolLM2-135M-Instruct", checkpoint.config.max_position, checkpoint.tokenizer)
    report = {"machine": platform.processor() or platform.machine(),
              "python": platform.python_version(), "repeats": args.repeats,
              "chat": time_chat(model, args.messages, args.repeats),
              "round": time_round(model, args.agents, args.repeats)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
