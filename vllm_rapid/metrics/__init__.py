"""RAPID's metrics: the per-step lane stats payload (engine core -> API server) and the Prometheus logger."""
