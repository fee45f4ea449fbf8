"""Prefect flows: orchestration only, no tensor code."""
