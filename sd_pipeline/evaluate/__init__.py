"""Evaluation of a trained run next to the champion: losses, evaluator metrics, picture grids.

``evaluate.evaluate`` is the stage; it publishes ``runs/<run_id>/eval/`` to the store.
``prompts`` loads versioned prompt sets, ``evaluators`` the CLIP and safety models whose
weights a config names, ``grids`` lays pictures out.
"""
