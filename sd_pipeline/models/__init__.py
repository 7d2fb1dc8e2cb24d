"""Base models: the tiny offline SD and SDXL, resolving and loading any SD 1.x/2.x or SDXL model,
and turning captions into what its UNet is conditioned on.

Importing this package is cheap; torch, diffusers and transformers load inside the modules.
"""
