"""A user's package: a model, a single-engine task and a two-engine task, written against the public
API only (`pipeline.Task`, `pipeline.Step`)."""
