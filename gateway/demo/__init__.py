"""``--demo``: a simulated Cohere batch API, and the config a demo runs with."""
