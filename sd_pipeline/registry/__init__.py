"""Registry: MLflow tracking of a pipeline run and registration of its model.

Nothing heavy is imported here; ``mlflow`` loads in the modules that use it.
"""
