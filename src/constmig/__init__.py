"""constmig: secure live migration of large enclaves with near-constant downtime."""

__version__ = "0.1.0"
