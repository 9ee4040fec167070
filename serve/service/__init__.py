"""The HTTP service on Ray Serve: an Ingress deployment (FastAPI) in front of Scorer deployments (one engine each)."""
