"""kvrt.runtime.policy."""
