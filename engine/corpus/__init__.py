"""The corpus: the answer path over documents (passages.py: BM25 passages; answer.py:
the grounded prompt and citations; engine.py: Engine, which asks a reader;
tasks.py: whole-document tasks) and the corpus cache (build.py, store.py: every
token's keys and values in segments on disk, read by cached reading when it is on)."""
