"""Bottom layer: the config schema, errors (one message, exit 2), progress bars, strict JSON;
imports nothing of the package."""
