"""Load testing (Locust) and the benchmark of the service against the offline and plain pipelines."""
