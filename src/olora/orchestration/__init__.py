"""Orchestration logic the Prefect flows call: workspaces and recorded runs, retry rules, sweeps, restore."""
