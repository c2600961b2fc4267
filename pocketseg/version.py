"""The package version, in one place: setup.py, manifests, run configs and reports read it from here."""

__version__ = "0.1.0"
