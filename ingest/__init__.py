"""Quire's ingestion: document readers (PDF, EPUB, TXT/MD, HTML, DOCX), text
normalisation and the library database. Never imports `engine`, `app` or Qt; the
app wires a tokenizer function in where token counts are needed."""
