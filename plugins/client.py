"""Built-in plugin `client` (being written)."""
