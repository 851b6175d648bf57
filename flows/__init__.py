"""Prefect flows: orchestration only (see flows/pipeline.py)."""
