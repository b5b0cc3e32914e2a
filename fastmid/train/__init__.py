"""The lean Mid-Block training loop, optimizers, checkpoints and export."""
