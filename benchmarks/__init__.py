"""pocketseg.benchmarks: measurements only: the efficiency harness, reports and plots, peers, benchmark scripts."""
