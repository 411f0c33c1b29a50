"""Built-in plugin `admin` (being written)."""
