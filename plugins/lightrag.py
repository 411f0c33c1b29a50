"""Built-in plugin `lightrag` (being written)."""
