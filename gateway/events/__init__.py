"""Following batches (docs/design.md §12): the event log, the follower, the feed, webhooks and usage."""
