"""Pure decisions and mathematics: OLoRA factors, the promotion rule, the convergence study statistics (no I/O)."""
