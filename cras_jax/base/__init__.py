"""Bottom layer: errors (one message, exit 2), progress bars; imports nothing of the package."""
