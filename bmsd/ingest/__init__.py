"""The ingest path, in the order a message takes it: mqtt → routing → payloads →
registry → ingestor (batches) → writer (with alerts, in one transaction); the
daemon runs it all over database, lock, health and notify."""
