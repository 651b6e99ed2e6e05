"""Quire's engine: model loading, tokenizers, backends, generation, the reader and the
corpus cache and answer path (`engine/corpus/`). The benchmarks are beside it (bench/).

The engine never imports `app`, `ingest` or Qt. torch and mlx are imported only
inside `engine/backends/<name>/`, lazily, so the package imports on a machine that
has only one of them.
"""
