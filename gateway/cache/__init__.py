"""Answers by batch id: the entry, the bounded store, single-flight, the batch
cache, waiting for a change and the refresher.
"""
