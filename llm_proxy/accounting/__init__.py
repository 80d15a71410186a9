"""Off the request path: finished calls become events, usage numbers and metrics."""
