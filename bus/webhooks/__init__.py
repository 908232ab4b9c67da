"""The webhook stage: endpoints, routing events to attempt jobs, signed delivery, limits, admin."""
