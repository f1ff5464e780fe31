"""A run's config beyond its schema: the check every command runs before any work (`check`),
the bounds of sizes and memory (`bounds`), and the population spec (`population`)."""
