"""Benchmarks: throughput and latency of each stage and of the whole pipeline."""
