"""Constants both ends of a migration (and the agents that carry it) agree on. Depends on nothing."""

DEMAND_LABEL = b"demand"  # derives the demand connection's keys from the main channel's (post-copy)
DATA_CHANNELS = ("main", "demand")  # the data connections' names, in order; a strategy uses the first N

# The names every party checks a request's options against (wire/control.py decodes them; the registry in
# strategies/__init__.py must match STRATEGIES, the code behind each name lives there and in its modules).
STRATEGIES = ("stopcopy", "constmig", "precopy", "hybrid", "auto")
TRACKERS = ("fault", "access")  # how a destination that runs before its heap is complete finds missing chunks
WRITE_TRACKING = ("auto", "kernel", "enclave")  # who reports the app's writes during pre-copy rounds (dirty.py)
