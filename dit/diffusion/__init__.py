"""Diffusion core: schedules, losses, samplers, guidance, editing (pure JAX functions)."""
