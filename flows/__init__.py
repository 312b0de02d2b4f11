"""Prefect flows over the stage table (`olora_pipeline.py`); a package so tests and tools import them by name."""
