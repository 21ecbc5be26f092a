"""Train state and steps, the phase pipeline, the host loop, sharding rules, the chip table."""
