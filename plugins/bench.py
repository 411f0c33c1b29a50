"""Built-in plugin `bench` (being written)."""
