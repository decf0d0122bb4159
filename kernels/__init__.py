"""kvrt.kernels."""
