"""The project's version, in a module of its own so that anything may read it without importing the
package's public API (pyproject.toml reads it too)."""

__version__ = "0.1.0"
