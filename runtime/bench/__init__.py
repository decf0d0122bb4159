"""kvrt.runtime.bench: benchmarks anyone can rerun."""
