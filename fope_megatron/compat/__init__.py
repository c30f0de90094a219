"""Compatibility shims for third-party versions (each module says which version needs it)."""
