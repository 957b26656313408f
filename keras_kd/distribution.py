"""How a per-replica loss relates to the global one.

Under `tf.distribute` each replica computes its loss on its share of the
batch and the gradients are summed over replicas, so a loss that is a mean
over the batch is divided by the replica count (Keras losses do this
themselves). JAX and PyTorch compute on the global batch (JAX shards it
behind one program), so nothing is scaled there.
"""

import keras


def replicas_in_sync():
    """The number of replicas of the current `tf.distribute` strategy (1
    outside one, and on every backend other than TensorFlow)."""
    if keras.backend.backend() != "tensorflow":
        return 1
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync


def scale_for_replicas(value):
    """A per-replica share of a global mean: `value / replicas`."""
    n = replicas_in_sync()
    return value / n if n > 1 else value


def unscale_for_replicas(value):
    """The global mean from a per-replica share: `value * replicas`."""
    n = replicas_in_sync()
    return value * n if n > 1 else value
