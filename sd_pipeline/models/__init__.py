"""Base models: the tiny offline Stable Diffusion, and resolving and loading any diffusers model.

Importing this package is cheap; torch, diffusers and transformers load inside the modules.
"""
