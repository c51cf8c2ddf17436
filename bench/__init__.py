"""Benchmarks (`make bench`): each result is reported next to a baseline measured in the same run."""
