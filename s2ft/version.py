"""The library version, recorded in every adapter it writes (pyproject.toml reads it from here)."""

__version__ = "0.1.0"
