"""ensemble: from saved model probabilities to label sets, in pure numpy / scipy / LightGBM.

Why a separate stage: the networks are expensive and the combination is cheap, so the stacker
and the decision rule can be re-fitted alone from saved probabilities (AUCMEDI-style metalearner)
and tested on plain arrays.

Flow: `inputs.StackingInputs` (global, per-category, router, kNN signals on the global columns)
-> `candidates.build_candidates` (union of each source's top-k per image)
-> `features.build_features` (one row per candidate pair)
-> `stacker.ConceptStacker` / `stacker.cross_fit_out_of_fold` (one LightGBM model for all concepts)
-> `decoding.choose_decision_rule` between `thresholds.ConceptThresholdTuner` (per-concept
   thresholds on the official F1) and `decoding.ExpectedF1Decoder` (per-image top-k)
-> `decoding.save_decision` / `load_decision` (RUN/ensemble/decision.json + the rule's JSON).
Everything saved is JSON or LightGBM text; nothing is pickled.
"""
