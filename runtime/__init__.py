"""pocketseg.runtime: inference on CPU and GPU: arrays, resampling, tiling, engines, the cascade, predict."""
