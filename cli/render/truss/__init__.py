"""Pure builders of Baseten Truss projects: the training project and the vLLM serving config. No I/O."""
