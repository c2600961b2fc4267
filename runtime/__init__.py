"""pocketseg.runtime: the cascade inference runtime (NumPy on CPU, CuPy on GPU)."""
