"""The load generator's version, recorded in every result file (its own module so the runner needs no import of
the package that re-exports the runner)."""

__version__ = "0.1.0"
