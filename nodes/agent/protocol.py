"""The agent protocol: the names and shapes the node agent and the server agree on.

Pure Python, imported by both sides (the agent installs without Django), so a value is written
once and the server's model choices are checked against it (tests/nodes/test_protocol.py)."""

REFUSED = "refused:"  # the prefix of the finish reason of an agent that would not run what it was sent
# The finish reason of an agent that would not start a job because a backyard limit (quiet hours,
# temperature, power budget) came into force after the placement. Unlike the other refusals it
# is transient, so the unit stays a candidate for the job.
REFUSED_FOR_LIMITS = "refused:limits"
