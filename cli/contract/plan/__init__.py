"""The planner: pure functions of (RunSpec, ModelShape) for memory, disk, FLOPs, time, cost and serving size."""
