"""What `cli.py` and `benchmarks/` call: the commands that turn a dataset into a run directory
and a run directory into submissions and reports.

By job, each package importing only those listed before it (and the model packages below:
core, data, training, router, category_models, ensemble, scoring):

- `devices`: multi-device plumbing: torchrun ranks (`devices.ranks`) and worker processes that
  train networks side by side (`devices.workers`). Imports nothing else from `pipeline`.
- `errors` (which exceptions are the user's input problems) and `image_sets` (a dataset folder
  as cached image arrays and label matrices): shared by everything above.
- `run`: run bookkeeping: every path of a run (`run.layout`), the table of its networks
  (`run.networks`), manifest and saved config (`run.directory`), lock, data fingerprint,
  category record, preflight checks, where predict may write, specialists' start from the
  global model. Knows what a run holds; trains and predicts nothing.
- `stages`: the commands: `train_all` (with `train_networks`), the stacker (`stacking`),
  `predict` (with `tta`), `evaluate`/validate, `ablation` (with `reports`, `concept_report`,
  `validation_scores`). Reads and writes the run only through `run`.

A change to what a run holds goes to `run`; a change to what a command does goes to `stages`.
"""
