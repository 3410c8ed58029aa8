"""Ingest: the event contract, the MIMIC-IV reader, the synthetic cohort, replay into Kafka."""
