"""Shared machinery: masks, validation, dispatch, numerics and test helpers."""
