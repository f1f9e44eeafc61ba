"""`ipdfer train`, `evaluate`, `export`: the training loop, evaluation reports,
logit calibration, the neutral-photo check, and turning a checkpoint into weights/."""
