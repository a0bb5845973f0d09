"""One module per ``mdgru-localize`` sub-command (see :mod:`mdgru_keras.cli`)."""
