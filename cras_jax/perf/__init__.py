"""Performance probes for the benchmark (matmul peak, profiles)."""
