"""Peer pipelines the benchmarks compare pocketseg's runtime against.

Each peer runs the networks of a pocketseg model package with another project's
inference machinery (its preprocessing, tiling, resampling and export), so that a
comparison measures the runtimes, not the models. Peers are optional: they need
the extra ``peers``.
"""
