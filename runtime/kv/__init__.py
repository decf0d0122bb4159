"""kvrt.runtime.kv."""
