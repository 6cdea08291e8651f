"""Harmony data pipeline: sources, rendering + label masks, packing. Needs no torch."""
