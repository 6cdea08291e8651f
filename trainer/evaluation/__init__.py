"""``gptoss-cloud eval``: held-out loss with its breakdowns, and harmony checks on generated replies."""
