"""Scheduling policies are plug-ins chosen by name (`--policy`), with options by name
(`--policy-option KEY=VALUE`: the fields of the policy's config dataclasses).

A policy decides two orders:
- `admission_key(call)`: waiting calls are admitted in ascending key order;
- `victim(running)`: which running call gives its blocks back when the pool runs dry
  (preempting is always safe: the call is recomputed later, from cached prefix blocks where
  they survive).
Eviction of unreferenced cached blocks is LRU inside the block pool. Between calls, an agent's
KV is the policy's to keep: the hooks below let it see the agents' tool calls and decide what
happens to their KV (runtime/policy/decisions.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from typing import ClassVar, TypeVar

from kvrt.runtime.config import ConfigError
from kvrt.runtime.kv.reuse.config import ReuseConfig
from kvrt.runtime.policy.decisions import Decision
from kvrt.runtime.policy.options import option_names, parse_options
from kvrt.runtime.policy.view import Call, Event, KVState

Decisions = Iterator[Decision]
CallT = TypeVar("CallT", bound=Call)

_REGISTRY: dict[str, type[Policy]] = {}


class Policy(ABC):
    """The orders are abstract; the hooks are optional and decide nothing by default (as `lru`).

    hook                       called by the ... when
    -------------------------  -------------------------------------------------------------
    on_event(event, kv, now)   engine     the control plane applied an agent's event
                                          (tool_call.started / .finished, agent.done; never a
                                          duplicate)
    on_admit(call, kv)         scheduler  it admits `call` (first time, or after a preemption),
                                          after the call adopted its prefix and grew: its own
                                          references now protect the blocks it reads
    on_finish(call, kv)        engine     `call` finished and released its blocks (its full
                                          ones now sit cached)
    on_keyed(block_ids, kv)    scheduler  a step filled these device blocks with computed KV
                                          and keyed them (findable, never written again)
    on_step(kv, now)           engine     before each step, and every ~50 ms while idle (the
                                          engine thread's idle wait), so expiries happen even
                                          when no request comes
    on_priorities(run,         engine     the server pushed new graph priorities of some of
      priorities, kv)                     `run`'s agents (agent -> priority); calls of theirs
                                          report them as `priority` already
    on_outlook(run,            engine     the server pushed the run's outlook: its remaining
      remaining_s, due, kv,               critical path (seconds; its calls report it as
      now)                                `remaining_s` already) and per agent the clock time
                                          of its next model call as predicted (None: it is
                                          done; inf: none is predicted)
    on_run_end(run)            engine     the run ended: its pins and its ownership of KV are gone
                                          already (the KV stays cached); forget any state kept
                                          for its agents
    on_stall(kv, now)          engine     it has work but scheduled nothing this step: blocks
                                          no live call reads (pins) hold the pool

    Contract:
    - Hooks run on the engine thread, between steps. A policy reads the KV only through `kv`
      (a KVState: per-owner counts) and yields its decisions; the engine carries each out
      before the hook goes on, so what the hook reads after a yield shows its effect.
    - Releasing a pin early is always safe (the KV stays cached, merely evictable again). A
      policy that pins must unpin at least one owner per `on_stall` while it holds any pin, or
      the engine turns over without progress until the pins expire.
    - Ending a run drops its agents' pins in the KV manager itself; a policy that keeps
      per-pin state sees it there (`kv.is_pinned`), no hook says so.
    - `now` is the engine's clock in seconds (a simulated one under `kvrt sim`).
    - `options`: the config dataclasses the policy is built from (`make_policy`).
    """

    name: ClassVar[str]
    options: ClassVar[tuple[type, ...]] = ()
    fixed_options: ClassVar[tuple[str, ...]] = ()  # fields of `options` the policy sets itself
    reuse: ReuseConfig = ReuseConfig()  # position-independent reuse: off unless a policy says

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> Policy:
        return cls(*parse_options(options, cls.options, cls.fixed_options))

    @abstractmethod
    def admission_key(self, call: Call) -> tuple: ...

    @abstractmethod
    def victim(self, running: list[CallT]) -> CallT: ...

    def on_event(self, event: Event, kv: KVState, now: float) -> Decisions:
        return iter(())

    def on_admit(self, call: Call, kv: KVState) -> Decisions:
        return iter(())

    def on_finish(self, call: Call, kv: KVState) -> Decisions:
        return iter(())

    def on_keyed(self, block_ids: list[int], kv: KVState) -> Decisions:
        return iter(())

    def on_step(self, kv: KVState, now: float) -> Decisions:
        return iter(())

    def on_stall(self, kv: KVState, now: float) -> Decisions:
        return iter(())

    def on_priorities(self, run: str, priorities: Mapping[str, float],
                      kv: KVState) -> Decisions:
        return iter(())

    def on_outlook(self, run: str, remaining_s: float, due: Mapping[str, float | None],
                   kv: KVState, now: float) -> Decisions:
        return iter(())

    def on_run_end(self, run: str) -> None:  # noqa: B027
        pass

    def kv_decisions(self) -> dict[str, int]:
        """Counts of the policy's decisions on agents' KV (for metrics); none by default."""
        return {}

    def kv_decisions_of(self, run: str) -> dict[str, str]:
        """Agent -> the last decision on its KV (for the run state); none by default. Called
        from the server's thread."""
        return {}


def register_policy(name: str):
    def add(cls: type[Policy]) -> type[Policy]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def policy_names() -> list[str]:
    return sorted(_REGISTRY)


def policy_option_names(name: str) -> list[str]:
    cls = _policy_class(name)
    return option_names(cls.options, cls.fixed_options)


def options_for(name: str, options: Mapping[str, str]) -> dict[str, str]:
    """Of `options`, those the policy `name` takes (one flag serves several compared policies)."""
    names = set(policy_option_names(name))
    return {key: value for key, value in options.items() if key in names}


def make_policy(name: str, options: Mapping[str, str] | None = None) -> Policy:
    """The policy `name`, its options set by name (values as text); a ConfigError for an
    unknown name, an option the policy does not take, or a bad value."""
    return _policy_class(name).from_options(options or {})


def _policy_class(name: str) -> type[Policy]:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown policy {name!r}; available: {', '.join(policy_names())}")
    return _REGISTRY[name]
