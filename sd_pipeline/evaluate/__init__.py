"""Evaluation of a trained run: held-out denoising loss against its base model, and a sample grid.

``evaluate.evaluate`` is the stage; it publishes ``runs/<run_id>/eval/`` to the store.
"""
