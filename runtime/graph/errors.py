"""The control plane's domain errors; the server maps them to HTTP statuses at its edge."""

from __future__ import annotations


class GraphError(ValueError):
    """A graph declaration that cannot be accepted (400); `param` points at the bad field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class NotFound(LookupError):
    """No such graph, run or agent (404). `kind` is "graph", "run" or "agent"."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Conflict(RuntimeError):
    """The request contradicts the current state (409): `code` says how."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class QuotaExceeded(RuntimeError):
    """A tenant holds as much as its quota allows (429): `quota` names the quota (the flag that
    sets it, without its dashes: "max_runs_per_tenant"). `too_large`: the thing asked for
    alone is more than the whole quota, so freeing room cannot help (413)."""

    def __init__(self, quota: str, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.quota = quota
        self.too_large = too_large
