"""The commands' work: `train_all` (networks through `train_networks`, then the stacker in
`stacking`), `predict` (`tta`: flip test-time augmentation), `evaluate` (and validate),
`ablation` (`reports`, `concept_report`, `validation_scores`). May import everything else in
`pipeline`; nothing in `pipeline` imports it."""
