"""The corpus: answering over documents, in layers.

- answerer.py `Answerer`: asks and runs the whole-document tasks (tasks.py), composing
  the three below; streams Token, Evidence and AskStats.
- retriever.py `Retriever`: the passages an answer reads (passages.py: BM25 over the
  scope's passages), numbered, each cited by one page.
- the reader (engine/reader.py): who writes the answer from them; answer.py holds the
  grounded prompt and the citations.
- cache.py `CorpusCache`: every token's keys and values in segments on disk (build.py,
  store.py, settings.py), read by cached reading when it is on."""
