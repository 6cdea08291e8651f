"""``gptoss-cloud bench``: our training step against the transformers + peft reference, same card, same run."""
