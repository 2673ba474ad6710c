"""Offline benchmarks that reproduce the paper's measurements on this machine."""
