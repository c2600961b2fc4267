"""pocketseg.benchmarks: evaluation metrics, efficiency harness and reproducible measurements."""
