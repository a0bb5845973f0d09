"""Training glue for mdgru-keras: the custom loop, checkpoints, strategies and logs.

``train_stage`` (in :mod:`mdgru_keras.training.stages`) trains the coarse or the fine stage into a run
directory; the ``mdgru-localize train`` command is a thin wrapper around it.
"""
