"""Helpers shared by several test folders (import as ``helpers.<module>``; ``tests/`` is on ``sys.path``)."""
