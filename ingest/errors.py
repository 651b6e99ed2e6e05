"""Named ingestion errors: each message is one line a user can act on, recorded
against the document it concerns; one bad file never stops the others."""

from __future__ import annotations


class IngestError(Exception):
    """Base class of every error ingest raises on purpose."""


class UnsupportedFormatError(IngestError):
    """The file is not one of the formats Quire reads (or lies about its extension)."""


class EncryptedDocumentError(IngestError):
    """The document is password-protected and no (correct) password was given."""


class CorruptDocumentError(IngestError):
    """The file is truncated, empty or malformed."""


class Cancelled(IngestError):
    """Ingestion stopped because its cancel flag was set."""


class LibraryError(IngestError):
    """The library cannot do what was asked: library.db unusable (damaged, written by a
    newer Quire), an empty search, a collection name already taken."""


class DocumentNotFoundError(LibraryError):
    """No document with the given id is in the library."""


class ConversationNotFound(LibraryError):
    """No conversation with the given id is in the library (deleted, or never was)."""


class MessageNotFound(LibraryError):
    """No message with the given id is in the library."""
