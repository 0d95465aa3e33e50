"""The library version, in one place: pyproject.toml reads it and the package imports it."""

__version__ = "0.1.0"
