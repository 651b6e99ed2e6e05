"""A file whose name promises PDF/EPUB/DOCX but whose bytes are something else says so."""

from __future__ import annotations

import pytest

from ingest.errors import CorruptDocumentError
from ingest.readers import read_document


@pytest.mark.parametrize("name", ["notes.pdf", "book.epub", "letter.docx"])
def test_text_named_as_a_binary_format(tmp_path, name):
    path = tmp_path / name
    path.write_text("just some plain text, not the format the name promises\n")
    with pytest.raises(CorruptDocumentError) as caught:
        read_document(path)
    message = str(caught.value)
    assert name in message and "\n" not in message
    assert f"not a {name.rsplit('.', 1)[1].upper()} file" in message
