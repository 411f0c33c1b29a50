"""Built-in plugin `serve` (being written)."""
