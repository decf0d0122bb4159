"""kvrt.sdk."""
