"""kvrt.runtime.server."""
