"""Plumbing shared by every part: errors, atomic writes, config helpers, setting checks."""
