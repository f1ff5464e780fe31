"""Method stages: pure functions and small Flax modules, one stage each (docs/method.md)."""
