"""kvrt.runtime."""
