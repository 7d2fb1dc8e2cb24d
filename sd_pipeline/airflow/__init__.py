"""Airflow glue: what the thin DAG files need (assets, params, task bodies).

Only this subpackage (with ``dags/`` and ``plugins/``) needs Airflow installed. Modules
here import nothing heavy at module level, so parsing a DAG stays cheap.
"""
