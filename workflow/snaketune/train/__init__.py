"""Stage 6, training: the models, their memory plan, batches, checkpoints and the trainer."""
