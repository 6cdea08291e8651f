"""Programs the control plane starts beside the training ranks: init-container fetchers and the local supervisor."""
