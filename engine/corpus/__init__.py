"""The corpus attention cache: KV-cache segments of documents, stored on disk."""
