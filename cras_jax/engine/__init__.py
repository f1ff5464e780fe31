"""The compiled model: model (stages composed), steps (pure step builders, TrainState), sharding (device mesh)."""
