"""Benchmarks behind `quire bench …`: each writes JSON; results go into docs/results.json (docs/BENCHMARKS.md)."""
