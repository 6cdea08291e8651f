"""Backends: local, Kubernetes (JobSet), Baseten Truss — one protocol."""
