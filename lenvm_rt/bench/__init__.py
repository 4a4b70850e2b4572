"""Benchmarks shipped with the package (run through `lenvm-rt bench ...`)."""
