"""cohere-gateway: one authenticated, caching front for Cohere's batch API."""

# The one place the version is written: pyproject.toml reads it (dynamic version),
# `cohere-gateway --version` prints it and /metrics exports it as gateway_build_info.
__version__ = "0.5.2"
