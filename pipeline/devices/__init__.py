"""Multi-device plumbing: torchrun ranks (`ranks`) and worker processes, one per device, that run
jobs side by side (`workers`, see docs/DISTRIBUTED.md). Imports nothing else from `pipeline`."""
