"""Maintenance tools: regenerate the embedded assets (run through `make`)."""
