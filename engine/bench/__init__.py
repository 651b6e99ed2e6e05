"""Benchmarks behind `quire bench …`: each writes JSON; results go into docs/BENCHMARKS.md."""
