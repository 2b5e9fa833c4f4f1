"""Agent Forge: the library behind the phase notebooks (see README.md)."""

__version__ = "0.1.0"
