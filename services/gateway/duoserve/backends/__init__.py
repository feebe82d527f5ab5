"""Backends: one module per server kind, all behind :class:`duoserve.backends.base.Backend`."""
