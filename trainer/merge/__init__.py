"""Merge a published checkpoint into a servable Hugging Face folder, streaming tensor by tensor."""
