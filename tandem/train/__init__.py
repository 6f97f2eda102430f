"""Training: sharded trainer on a device mesh, Grain data, Orbax checkpoints (see docs/training.md)."""
