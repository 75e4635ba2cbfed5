"""To the upstream: the canonical path, header policy, upstream routing, the client pool."""
