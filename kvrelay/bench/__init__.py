"""Benchmark suites behind `kvrelay bench <suite>`; each suite is a module here with a `run(ctx)`."""
