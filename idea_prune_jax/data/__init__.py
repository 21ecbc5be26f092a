"""Input sources, prepare-data, the grain stream, storage (local or gs://); the embedded corpus."""
