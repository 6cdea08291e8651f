"""The data plane: what runs in the pod. Importing this package does not import torch."""
