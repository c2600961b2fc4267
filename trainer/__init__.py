"""pocketseg.trainer: the Pocket U-Net, preprocessing, data loading and training loops."""
