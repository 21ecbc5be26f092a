"""compare and sweep: several pipelines run and reported together."""
