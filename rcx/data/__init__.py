"""Prompts and rewards: the built-in tasks, parquet datasets and the reward functions."""
