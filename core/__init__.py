"""spl: inference engine for long-context models with superlinear attention.

The import name is ``superlinear`` (source folder ``core/``). Keep this module light:
``spl --help`` imports it and must not pull in torch.
"""

__version__ = "0.1.0"
