"""Quire's composition root: the desktop app and the `quire` CLI wire `engine` and
`ingest` together. Nothing outside `app` imports it."""
