"""Built-in plugin `rag` (being written)."""
