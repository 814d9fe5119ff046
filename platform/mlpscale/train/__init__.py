"""Pretraining: the Ray Train worker loop and its parts (losses, optimizers, schedules, precision, checkpoints)."""
