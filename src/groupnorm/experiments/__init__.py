"""The reproduction experiment: ``groupnorm reproduce`` (data, model, training, report).

Nothing here is imported by ``import groupnorm``; the CLI imports it when the command runs.
"""
