"""Constants both ends of a migration (and the agents that carry it) agree on. Depends on nothing."""

DEMAND_LABEL = b"demand"  # derives the demand connection's keys from the main channel's (post-copy)
DATA_CHANNELS = ("main", "demand")  # the data connections' names, in order; a strategy uses the first N
