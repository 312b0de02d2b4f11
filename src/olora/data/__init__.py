"""Fine-tuning data: sources (embedded sets, files, hub) and prompt templates."""
