"""Pure builders of Kubernetes objects: training JobSet, serving objects, GitOps trees. No I/O."""
