"""Optional Triton: the import, the interpreter switch and per-mode jitting, shared by the kernels.

Triton is an optional dependency (the `triton` extra), so nothing here may fail when it is
missing: `triton` and `tl` are then None and `require_triton()` explains what to install.

Triton reads TRITON_INTERPRET when a function is decorated, not when it runs. The kernels are
therefore kept as plain functions and jitted on first use, once per mode, so one process can run
them both interpreted (CPU tests) and compiled (CUDA) without depending on import order.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # SDK-only and CPU installs: the torch references still work
    triton = None
    tl = None

# Triton's own variable (not ours, hence no KVRT_ prefix); read at call time, never at import.
TRITON_INTERPRET_ENV = "TRITON_INTERPRET"


def triton_available() -> bool:
    return triton is not None


def interpret_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (tests on a machine without a GPU)."""
    # The same truthy spellings as Triton's own parser, so both always agree on the mode.
    return os.environ.get(TRITON_INTERPRET_ENV, "").strip().lower() in ("1", "true", "on", "yes")


def require_triton() -> None:
    if triton is None:
        raise RuntimeError("Triton is not installed: pip install 'kvrt[triton]'")


def check_launch_device(*tensors: torch.Tensor) -> None:
    """Compiled Triton needs CUDA tensors; CPU tensors are fine only under the interpreter."""
    if interpret_enabled():
        return
    for t in tensors:
        if t.device.type != "cuda":
            raise ValueError(
                f"Triton kernels need CUDA tensors, got {t.device}; "
                f"set {TRITON_INTERPRET_ENV}=1 to run them in the interpreter"
            )


def jitted(fn: Callable) -> Callable:
    """`fn` decorated with triton.jit for the current mode (interpreted or compiled)."""
    require_triton()
    return _jit_for_mode(fn, interpret_enabled())


@functools.cache
def _jit_for_mode(fn: Callable, interpret: bool) -> Callable:
    # `interpret` is only the cache key: triton.jit reads the same variable itself right now.
    del interpret
    return triton.jit(fn)
