"""pocketseg.trainer: preprocessing, data loading, losses, the trainer, self-training, a run's model package."""
