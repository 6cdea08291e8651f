"""Pure renderers: RunSpec -> Kubernetes objects / Truss project files. No I/O."""
