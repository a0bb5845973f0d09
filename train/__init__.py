"""Entry-point scripts for training (run from the repository root, not installed).

``python -m train.model_afids`` (``make model-afids``) trains the shipped model. The training loop itself is
library code: :mod:`mdgru_keras.training`.
"""
