"""Input sources, prepare-data, the grain stream, the batch, storage (local or gs://); the corpus."""
