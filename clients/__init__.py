"""Flower ClientApp for fedistill (the federation issue fills this package)."""
