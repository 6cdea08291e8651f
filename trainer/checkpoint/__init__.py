"""Sharded checkpoints: save, publish to the run store, verify, resume; sizes, faults and measurements."""
