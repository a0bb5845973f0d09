"""Distribution strategies (TensorFlow's own engine) and mixed precision.

``config.training.distribution`` chooses:

* ``default``: one device (the first GPU when there is one, else the CPU).
* ``mirrored``: :class:`tf.distribute.MirroredStrategy` over all GPUs of this machine; without GPUs over
  all *logical* CPU devices when more than one is configured (how the multi-device path is tested on CPU).
* ``multi_worker``: :class:`tf.distribute.MultiWorkerMirroredStrategy` across the machines named in the
  ``TF_CONFIG`` environment variable (each machine runs the same command with its own ``task.index``).

The trainer feeds every replica its slice of one *global* batch (see :func:`split_global_batch`), so the loss of
a step is the same whatever the number of replicas, for the same global batch and seed.
"""

from __future__ import annotations

import json
import os
import warnings

import keras
import tensorflow as tf

from mdgru_keras.errors import InputError


def make_strategy(distribution: str) -> tf.distribute.Strategy:
    """The ``tf.distribute`` strategy for ``distribution`` (``default``, ``mirrored`` or ``multi_worker``)."""
    if distribution == "default":
        return tf.distribute.get_strategy()
    if distribution == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        if gpus:
            return tf.distribute.MirroredStrategy([device.name for device in gpus])
        cpus = tf.config.list_logical_devices("CPU")
        # NCCL is GPU-only; on CPUs reduce through one device.
        return tf.distribute.MirroredStrategy(
            [device.name for device in cpus], cross_device_ops=tf.distribute.ReductionToOneDevice()
        )
    if distribution == "multi_worker":
        tf_config = os.environ.get("TF_CONFIG")
        if not tf_config:
            raise InputError(
                "TF_CONFIG", "training.distribution is multi_worker but the TF_CONFIG environment variable is unset"
            )
        try:
            cluster = json.loads(tf_config)["cluster"]["worker"]
        except (ValueError, KeyError, TypeError) as error:
            raise InputError("TF_CONFIG", f"not a valid cluster description ({error})") from None
        if not cluster:
            raise InputError("TF_CONFIG", "no workers in cluster.worker")
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.AUTO
        )
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    raise ValueError(f"unknown distribution {distribution!r} (default, mirrored, multi_worker)")


def worker_index(strategy: tf.distribute.Strategy) -> int:
    """This worker's index in a multi-worker cluster (0 otherwise)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type is None:
        return 0
    return int(resolver.task_id or 0)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run directory (the only process, or worker 0 of a cluster)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type in (None, "chief"):
        return True
    return resolver.task_type == "worker" and int(resolver.task_id or 0) == 0 and not _has_chief(resolver)


def _has_chief(resolver) -> bool:
    try:
        return "chief" in resolver.cluster_spec().as_dict()
    except (AttributeError, ValueError):
        return False


def num_workers(strategy: tf.distribute.Strategy) -> int:
    return int(getattr(strategy.extended, "_num_workers", 1) or 1)


def split_global_batch(strategy: tf.distribute.Strategy, batch, global_batch_size: int):
    """Give each replica (over all workers) its consecutive slice of one global ``batch`` (a nest of tensors).

    Every worker reads the same global batch from the same seeded pipeline; replica ``r`` of ``R`` takes rows
    ``[r * B / R, (r + 1) * B / R)``. With one replica the batch is returned unchanged.
    """
    replicas = strategy.num_replicas_in_sync
    if replicas == 1:
        return batch
    per_replica = global_batch_size // replicas

    def value_fn(context: tf.distribute.experimental.ValueContext):
        start = context.replica_id_in_sync_group * per_replica
        return tf.nest.map_structure(lambda tensor: tensor[start : start + per_replica], batch)

    return strategy.experimental_distribute_values_from_function(value_fn)


def set_mixed_precision(enabled: bool) -> str:
    """Set Keras' global dtype policy; returns its name. Mixed float16 only pays off on GPUs."""
    if enabled and not tf.config.list_physical_devices("GPU"):
        warnings.warn("training.mixed_precision is set but there is no GPU; training in float32", stacklevel=2)
        enabled = False
    policy = "mixed_float16" if enabled else "float32"
    keras.mixed_precision.set_global_policy(policy)
    return policy
