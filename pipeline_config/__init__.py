"""Typed configuration, templates and prompts."""
