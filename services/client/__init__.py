"""A Python client for notebooks and scripts: ``from services.client import Client``."""

from services.client.client import Client, WaitTimeout

__all__ = ["Client", "WaitTimeout"]
