"""Running it: JSON logs with redaction, Prometheus metrics, and the workers' parent."""
