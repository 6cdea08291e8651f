"""Rehearse a multi-node run on one host: the rendered JobSet's pods as local node groups."""
