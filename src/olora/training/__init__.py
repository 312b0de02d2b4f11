"""Training: the Trainer set-up, checkpoints and resume, padding-free packing, the distributed launch."""
