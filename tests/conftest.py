"""Shared test settings: a persistent XLA compilation cache for the session, so the
end-to-end tests that start several processes compile each step once."""
import os
import tempfile

import jax

_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                               os.path.join(tempfile.gettempdir(), "cras_jax_test_xla_cache"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
