"""The trace stage: run trees merged from bus events, their storage, and the HTTP read API."""
