"""Built-in plugins (import name ``superlinear.plugins``).

Each is registered through the ``spl`` entry-point group, exactly like a third-party plugin.
"""
