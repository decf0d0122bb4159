"""kvrt.runtime.engine."""
