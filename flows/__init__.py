"""Culbot flows."""
