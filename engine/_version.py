"""The package's version, in one place: ``engine.__version__`` and pyproject.toml read it.

A literal assignment, so that setuptools reads it without importing the package (and its compiled core).
"""

__version__ = "0.1.0"
