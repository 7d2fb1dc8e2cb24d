"""sd-pipeline: Stable Diffusion fine-tuning as a production pipeline.

Every stage is a plain function here and an ``sd-pipeline`` subcommand; Airflow DAGs in
``dags/`` only call them. Importing this package is cheap: heavy stacks load where used.
"""

__version__ = "0.1.0"
