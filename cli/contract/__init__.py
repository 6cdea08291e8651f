"""The contract both planes share: the run spec, model shapes, errors, the run store, the planner.

The control plane (``gptoss_cloud``) and the data plane (``gptoss_cloud.trainer``) import it; it imports neither.
No torch here."""
