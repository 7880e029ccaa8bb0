"""Culbot stages: pure cores plus thin Prefect tasks."""
