"""Deployment files for serving the exported localizer (run from the repository root, not installed).

``models.config`` and the docker command in ``README.md`` run the official TensorFlow Serving image;
``python -m serving.loadtest`` is a small load test of a running server. The clients, the in-process
development servers (``mdgru-localize serve``) and the exporter are library code: :mod:`mdgru_keras.serving`
and :mod:`mdgru_keras.export`.
"""
