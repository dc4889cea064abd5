"""Adapters and fine-tuning on mlx-lm's tuner."""
