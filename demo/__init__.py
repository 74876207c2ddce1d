"""A demo batch through a real worker: ``python -m demo``."""
