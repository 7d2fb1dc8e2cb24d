"""Quality gate: a dataset version's manifest checked by Great Expectations before acceptance.

Nothing heavy is imported here; ``great_expectations`` and ``pandas`` load in the modules
that use them.
"""
