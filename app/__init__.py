"""Quire's composition root: the desktop app and the `quire` CLI wire `engine` and
`ingest` together. Neither `engine` nor `ingest` imports it; the benchmarks beside the
product (bench/) do, and `quire bench` reaches them only as a plugin (app/cli.py)."""
