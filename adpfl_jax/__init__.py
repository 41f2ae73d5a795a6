"""adpfl_jax."""
