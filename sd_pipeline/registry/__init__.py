"""Registry: MLflow tracking and registration of a run, its model card, and the champion.

``tracking`` logs and registers, ``model_card`` writes MODEL_CARD.md, ``lineage`` finds the
git commit and Airflow ids, ``promotion`` decides and records champion/challenger moves and
rollbacks. Nothing heavy is imported here; ``mlflow`` loads in the functions that use it.
"""
