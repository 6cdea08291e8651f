"""Command groups, one module each: ``register(app)`` adds its commands; heavy imports stay inside the commands."""
