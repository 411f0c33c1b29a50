"""Built-in plugin `chat` (being written)."""
