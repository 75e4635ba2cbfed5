"""The HTTP layer: the front door, middlewares, every handler and their shared answers."""
