"""jaxt2i: Imagen-style text-to-image diffusion in JAX/Flax.

A frozen T5 text encoder, a cascade of pixel-space diffusion U-Nets, sharded training with
Orbax checkpoints, jit-compiled samplers and exporters. See README.md and DESIGN.md.
"""

__version__ = "0.1.0"
