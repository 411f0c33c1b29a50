"""Built-in plugin `models` (being written)."""
