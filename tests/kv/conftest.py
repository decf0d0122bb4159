"""The Triton device fixtures of tests/kernels, for the mover's tests that run its kernels."""

from tests.kernels.conftest import cuda_triton, triton_device

__all__ = ["cuda_triton", "triton_device"]
