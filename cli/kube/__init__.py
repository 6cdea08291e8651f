"""The one Kubernetes client: configuration, calls, create-or-update, and API error translation."""
