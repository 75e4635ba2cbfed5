"""The Redis backend: connection, key layout, store, locks, events, change feed.

The only package that imports redis-py (docs/architecture.md, "Sessions and Redis").
"""
