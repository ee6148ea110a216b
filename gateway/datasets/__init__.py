"""Datasets through the gateway (docs/design.md §11): uploads, part links and downloads."""
