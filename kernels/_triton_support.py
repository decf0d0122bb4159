"""Optional Triton: availability, the interpreter switch, and the lazy import of the kernels.

Triton is an optional dependency (the `triton` extra) and is imported only when a Triton kernel
is first launched, never by `import kvrt.kernels`. That is also what lets tests choose the mode:
Triton fixes interpreted vs compiled for the whole process when it is first imported (its own
library functions are jitted then), so TRITON_INTERPRET must be set before that moment.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType

import torch

# Triton's own variable (not ours, hence no KVRT_ prefix); read when needed, never at import.
TRITON_INTERPRET_ENV = "TRITON_INTERPRET"


def triton_available() -> bool:
    """Whether Triton is installed, without importing it (an import would fix its mode)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except ValueError:  # sys.modules["triton"] is None: deliberately made unimportable
        return False


def interpret_enabled() -> bool:
    """Whether TRITON_INTERPRET asks for Triton's CPU interpreter (tests without a GPU)."""
    # The same truthy spellings as Triton's own parser, so both always agree on the mode.
    return os.environ.get(TRITON_INTERPRET_ENV, "").strip().lower() in ("1", "true", "on", "yes")


@functools.cache
def triton_kernels() -> ModuleType:
    """The module of @triton.jit kernels, imported on first use."""
    if not triton_available():
        raise RuntimeError("Triton is not installed: pip install 'kvrt[triton]'")
    module = importlib.import_module("kvrt.kernels._triton_jit")
    if module.INTERPRETED != interpret_enabled():
        raise RuntimeError(
            f"Triton was imported with {TRITON_INTERPRET_ENV}={'1' if module.INTERPRETED else '0'}"
            " before kvrt's kernels were; set the variable before anything imports Triton"
        )
    return module


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def check_launch_device(*tensors: torch.Tensor) -> None:
    """Compiled Triton needs CUDA tensors; CPU tensors are fine only under the interpreter."""
    if triton_kernels().INTERPRETED:
        return
    for t in tensors:
        if t.device.type != "cuda":
            raise ValueError(
                f"Triton kernels need CUDA tensors, got {t.device}; "
                f"set {TRITON_INTERPRET_ENV}=1 before Triton is imported to run them on CPU"
            )
