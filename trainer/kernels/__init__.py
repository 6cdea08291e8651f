"""Fast kernels, each beside its eager reference."""
