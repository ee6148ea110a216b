"""What replicas and workers share through Redis: the link, the shared cache and single-flight, the shared budget."""
