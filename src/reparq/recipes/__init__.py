"""Passes and recipes."""
