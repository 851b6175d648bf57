"""Prefect task wrappers around the stages of `expert/` (one shared mechanism in `stage.py`)."""
