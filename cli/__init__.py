"""The ``spl`` command line (import name ``superlinear.cli``)."""
