"""kvrt.runtime.model."""
