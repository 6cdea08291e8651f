"""Benchmark suites: named sets of benchmark runs (suites.toml) and the runner behind `gptoss-cloud bench --suite`.

The suites drive the command line (each step is a `gptoss-cloud ...`, `python -m pytest` or `python -m gptoss_cloud...`
argument list), so they live on the control plane; what a step measures is the data plane's (trainer/bench/)."""
