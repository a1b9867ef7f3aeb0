"""Names shared by the server and the agent's wire format for refusals."""

# The finish reason of an agent that would not start a job because a backyard limit (quiet hours,
# temperature, power budget) came into force after the placement. Unlike the other refusals it
# is transient, so the unit stays a candidate for the job.
REFUSED_FOR_LIMITS = "refused:limits"
