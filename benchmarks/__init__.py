"""fastddpm's benchmark suite: `python -m benchmarks [--quick]` measures, `python -m
benchmarks.plot` draws, `python -m benchmarks.table --readme` writes the README table.
The pytest-benchmark files (`pytest benchmarks/ --benchmark-only`) time the CPU kernels."""
