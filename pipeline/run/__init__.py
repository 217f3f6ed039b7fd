"""Run bookkeeping: what a run directory holds and whether it can be trusted.

`layout` (every path), `networks` (the table of the run's networks), `directory` (manifest and
saved config), `lock`, `fingerprint` (the data a run was trained on), `category_record`,
`preflight` (machine and data checks before any work), `output_paths` (where predict may write),
`specialist_init` (category models started from the global model). May import
`pipeline.devices`, `pipeline.errors`, `pipeline.image_sets` and the model packages; never
`pipeline.stages`.
"""
