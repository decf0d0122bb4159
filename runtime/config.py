"""One typed configuration for the daemon and its engine, validated when built."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
KERNELS = ("auto", "torch", "triton")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


class ConfigError(ValueError):
    """A configuration value is out of range or malformed."""


def parse_size(text: str | int) -> int:
    """'512MiB', '2G', '1.5GB', '1048576' -> bytes (K/M/G/T are powers of 1024)."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"not a size: {text!r} (examples: 512MiB, 2GiB, 1073741824)")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** "kmgt".find(unit) * 1024) if unit else int(number)


def format_size(size: int) -> str:
    """Bytes as the README and the flags write them: the largest binary unit that divides them
    exactly (536870912 -> '512MiB', 1536 -> '1536', 0 -> '0'); parse_size reads it back."""
    for unit, power in (("TiB", 4), ("GiB", 3), ("MiB", 2), ("KiB", 1)):
        if size and size % 1024**power == 0:
            return f"{size // 1024**power}{unit}"
    return str(size)


def parse_key_value(text: str) -> tuple[str, str]:
    """'KEY=VALUE' -> (key, value), both stripped."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str | None = None  # local checkpoint folder or GGUF file; None = default SmolLM2
    device: str = "auto"
    dtype: str = "auto"  # auto = float32 on CPU (exactness), bfloat16 on CUDA
    kv_cache_memory: int = 512 * 1024**2  # bytes of the device KV pool
    host_cache_memory: int = 0  # bytes of the host tier KV is offloaded to; 0: no host tier
    block_size: int = 16
    max_model_len: int | None = None  # None = the model's own context length
    max_num_seqs: int = 32  # sequences in the running batch
    max_num_batched_tokens: int = 512  # per-step token budget (chunked prefill)
    prefix_caching: bool = True  # off: every prompt is computed in full (for comparisons)
    policy: str = "lru"
    # The policy's options by name, as text (`--policy-option KEY=VALUE`; runtime/policy/).
    policy_options: dict[str, str] = field(default_factory=dict)
    kernels: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        _choose("device", self.device, DEVICES)
        _choose("dtype", self.dtype, DTYPES)
        _choose("kernels", self.kernels, KERNELS)
        _positive(self, "kv_cache_memory", "block_size", "max_num_seqs", "max_num_batched_tokens")
        _non_negative(self, "host_cache_memory")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ConfigError(f"max_model_len must be positive, got {self.max_model_len}")


@dataclass(frozen=True, slots=True)
class ControlConfig:
    """The control plane's cost model and limits. An agent's expected work in seconds is its
    expected output tokens times `seconds_per_output_token` plus its tools' expected seconds,
    both learned per graph from its runs (runtime/graph/learning.py). A declared edge counts
    towards priorities while its source has been left fewer than
    `transition_prior_observations` times, and after that only if at least `min_branch_share`
    of those departures took it."""

    seconds_per_output_token: float = 0.02  # a decode step of a small model on one GPU
    default_output_tokens: int = 256  # for agents that do not declare expected_output_tokens
    max_live_runs: int = 4096
    # Per tenant, so that one tenant cannot take every run slot or fill the graph store.
    max_runs_per_tenant: int = 1024
    max_graphs_per_tenant: int = 1024
    # A live run with no call in flight and no event, call or round for this long (past the
    # predicted end of its running tools and waits) ends by itself, its KV released; 0: never.
    run_idle_timeout_s: float = 3600.0
    # Their declarations' compact JSON together (GraphInfo.declared_bytes): what the state
    # store keeps and a restart declares again, at some 0.15 s a MiB of the densest graphs
    # (runtime/bench/restart_speed.py), so a tenant at this default adds about 2.5 s.
    max_graph_bytes_per_tenant: int = 16 * 1024**2
    # The agents of a tenant's live runs together. A run holds one activity per agent of its
    # graph (runtime/graph/runs.py): some 300 bytes idle, about 1 KB once the agent has called,
    # used a tool and waited. Without it 1,024 runs of 4,096-agent graphs (the run quota, the
    # declaration limit) would hold 4 to 7 GB; this default, 1,024 runs of 256 agents or 64 of
    # the largest, holds some 65 MB fresh and 250 MB with every agent used.
    max_run_agents_per_tenant: int = 256 * 1024
    transition_prior_observations: int = 3
    min_branch_share: float = 0.05

    def __post_init__(self) -> None:
        if self.seconds_per_output_token < 0 or self.default_output_tokens < 0:
            raise ConfigError("the control plane's cost model takes no negative values")
        for name in ("max_live_runs", "max_runs_per_tenant", "max_graphs_per_tenant",
                     "max_graph_bytes_per_tenant", "max_run_agents_per_tenant"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.run_idle_timeout_s < 0:
            raise ConfigError(f"run_idle_timeout_s cannot be negative, got "
                              f"{self.run_idle_timeout_s}")
        if self.transition_prior_observations < 1:
            raise ConfigError("transition_prior_observations must be positive, got "
                              f"{self.transition_prior_observations}")
        if not 0 <= self.min_branch_share <= 1:
            raise ConfigError(f"min_branch_share must be in [0, 1], got {self.min_branch_share}")


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What the daemon accepts before it pushes back (runtime/server/admission.py): past the
    queue bounds a request gets 429 with Retry-After; past the body size 413."""

    max_queued_requests: int = 1024  # requests waiting for the engine
    max_queued_tokens: int = 4 * 1024**2  # their prompt tokens
    # The part of both bounds one tenant may hold while the server has several tenants, so
    # that one tenant's burst leaves room in the queue for the others.
    max_queue_share_per_tenant: float = 0.5
    request_timeout_s: float = 600.0  # a request's whole life, queue included; 0: none
    max_body_bytes: int = 64 * 1024**2  # agent prompts carry long histories
    # With several tenants, the bytes of bodies one tenant may send a second (in bursts of
    # max_body_bytes): decoding them holds the event loop (runtime/server/body_rate.py).
    max_body_bytes_per_s_per_tenant: int = 32 * 1024**2
    max_messages: int = 4096  # per chat request or round
    max_events_per_s: float = 500.0  # per run, averaged over a burst of as many
    shutdown_timeout_s: float = 30.0  # in-flight work finishes within this, then is aborted
    # A connection's request line and headers must be in within this many seconds of its
    # opening or of its previous response (runtime/server/http_protocol.py), so a client that
    # sends nothing, or its headers a byte at a time, cannot hold a connection for long.
    header_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        _positive(self, "max_queued_requests", "max_queued_tokens", "max_body_bytes",
                  "max_messages", "max_events_per_s", "header_timeout_s")
        _non_negative(self, "request_timeout_s", "shutdown_timeout_s",
                      "max_body_bytes_per_s_per_tenant")
        if not 0 < self.max_queue_share_per_tenant <= 1:
            raise ConfigError("max_queue_share_per_tenant must be in (0, 1], got "
                              f"{self.max_queue_share_per_tenant}")


DEFAULT_TENANT = "default"
_TENANT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_KEY_CHARS = re.compile(r"[\x21-\x7e]*")  # printable ASCII, no spaces: what a header carries


def check_key(key: str) -> str:
    """An API or admin key as given: at least 8 printable ASCII characters, no spaces. The
    message never shows the key (it may be a real one, and errors end up in logs)."""
    if not key:
        raise ConfigError("an API key is empty")
    if not _KEY_CHARS.fullmatch(key):
        at = next(i for i, c in enumerate(key) if not _KEY_CHARS.fullmatch(c))
        raise ConfigError(f"an API key may hold only printable ASCII characters and no spaces; "
                          f"this one has {key[at]!r} at position {at + 1}")
    if len(key) < 8:
        raise ConfigError(f"an API key needs at least 8 characters, this one has {len(key)}")
    return key


def parse_api_key(text: str) -> tuple[str, str]:
    """'KEY[:TENANT]' -> (key, tenant); a key without a tenant belongs to the default one.
    Spaces around the line and around the ':' are not part of either."""
    key, colon, tenant = (part.strip() for part in text.strip().partition(":"))
    if colon and not key:
        raise ConfigError("no key before the ':'")
    if colon and not tenant:
        raise ConfigError("no tenant after the ':' (leave the ':' out for the default tenant)")
    check_key(key)
    tenant = tenant or DEFAULT_TENANT
    if not _TENANT_NAME.fullmatch(tenant):
        raise ConfigError(f"bad tenant name {tenant!r} (letters, digits, _ . -; at most 64)")
    return key, tenant


def read_api_keys(path: str) -> list[tuple[str, str]]:
    """A keys file: one KEY[:TENANT] per line; blank lines and # comments are skipped. Editors'
    habits are taken as meant: a UTF-8 byte-order mark, CRLF line ends, spaces around a line.
    Anything else is refused naming the line (a malformed key, a key given twice), so that no
    key silently becomes another."""
    try:
        with open(path, encoding="utf-8-sig") as file:  # universal newlines: CRLF is a line end
            text = file.read()
    except OSError as exc:
        raise ConfigError(f"cannot read the API keys file: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"the API keys file {path} is not UTF-8 text (byte {exc.start + 1}: "
                          f"{exc.reason}); save it as UTF-8") from None
    keys: list[tuple[str, str]] = []
    first_seen: dict[str, int] = {}
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            key, tenant = parse_api_key(line)
        except ConfigError as exc:
            raise ConfigError(f"the API keys file {path}, line {number}: {exc}") from None
        if key in first_seen:
            raise ConfigError(f"the API keys file {path}, line {number}: the key of line "
                              f"{first_seen[key]} again (each key belongs to one tenant)")
        first_seen[key] = number
        keys.append((key, tenant))
    return keys


@dataclass(frozen=True, slots=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8400
    log_level: str = "info"
    served_model_name: str | None = None  # None = derived from the checkpoint
    # How replies are read for tool calls (runtime/server/tool_parsers.py, by name).
    tool_call_parser: str = "hermes"
    # Tenants (runtime/server/auth.py): (API key, tenant) pairs. None given: no key is asked
    # for, and every caller is the default tenant.
    api_keys: tuple[tuple[str, str], ...] = ()
    # Operator keys (`--admin-key`): they open /metrics, with per-tenant figures, and nothing
    # else. Given any, or any tenant key, /metrics needs one (unless public).
    admin_keys: tuple[str, ...] = ()
    metrics_public: bool = False  # /metrics answers without a key (no per-tenant figures)
    state_dir: str | None = None  # graphs and run metadata persist here (SQLite); None: not
    limits: ServerLimits = field(default_factory=ServerLimits)
    engine: EngineConfig = field(default_factory=EngineConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    # Engine replicas as Ray actors behind this daemon (runtime/replicas/): None is one, in
    # this process, without Ray; on a Ray cluster (`ray_address`), one per GPU.
    replicas: int | None = None
    ray_address: str | None = None  # join this Ray cluster; None: a local instance if needed
    router: str = "affinity"  # which replica a call goes to (runtime/replicas/router.py)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        tenant_of: dict[str, str] = {}
        for key, tenant in self.api_keys:
            if key in tenant_of:
                raise ConfigError(f"an API key is given twice (for tenant {tenant_of[key]!r} "
                                  f"and for {tenant!r})")
            tenant_of[key] = tenant
        for number, key in enumerate(self.admin_keys, start=1):
            check_key(key)
            if key in tenant_of:
                raise ConfigError(f"admin key {number} is also an API key of tenant "
                                  f"{tenant_of[key]!r}; give the operator a key of its own")
        if len(set(self.admin_keys)) != len(self.admin_keys):
            raise ConfigError("an admin key is given twice")
        if self.replicas is not None and self.replicas < 1:
            raise ConfigError(f"replicas must be at least 1, got {self.replicas}")
        if self.ray_address is not None and not self.ray_address.strip():
            raise ConfigError("ray_address is empty (leave it out for a local Ray instance)")


def _positive(config: object, *names: str) -> None:
    for name in names:
        if getattr(config, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(config, name)}")


def _non_negative(config: object, *names: str) -> None:
    for name in names:
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} cannot be negative, got {getattr(config, name)}")


def _choose(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
