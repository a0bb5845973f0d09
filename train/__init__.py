"""Training glue for mdgru-keras: the custom loop, checkpoints, strategies and logs.

``train_stage`` (in :mod:`train.stages`) trains the coarse or the fine stage into a run directory; the
``mdgru-localize train`` command is a thin wrapper around it.
"""
