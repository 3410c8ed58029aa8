"""Features: definitions, the Redis online store, the offline builder, CXR preprocessing."""
