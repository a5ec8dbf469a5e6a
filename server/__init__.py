"""Flower ServerApp, strategy and aggregation rules for fedistill (the federation issue fills this package)."""
