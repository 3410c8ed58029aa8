"""The stream engine: Kafka worker, micro-batched scoring on Triton, risk scores, queries."""
