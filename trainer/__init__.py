"""Trainer: M3T-LM, training, evaluation, export and publishing to model_repo/."""
