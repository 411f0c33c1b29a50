"""The model shapes behind ``--model random:NAME``: config files only (package data)."""
