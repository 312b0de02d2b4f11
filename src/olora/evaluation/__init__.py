"""Evaluation with lm-eval: the task list (offline and hub), running it on a model, summaries and reports."""
