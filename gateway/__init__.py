"""cohere-gateway: one authenticated, caching front for Cohere's batch API."""

__version__ = "0.1.0"
