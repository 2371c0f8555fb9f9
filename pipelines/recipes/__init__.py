"""Training recipes: one object per training stage that keeps its state on `self` (models,
optimizers, data, step, metric history) with `restore()`, `checkpoint()`, `validate()` and
`train()`. What both share (the checkpoint file and its resume rules, gathering every rank's
state, the replica check) is in `checkpointing`; the Ray Train launch in `pipelines.distributed`."""
