"""pocketseg: cascaded Pocket U-Net segmentation of abdominal CT with FLARE 2023 labels."""

__version__ = "0.1.0"
