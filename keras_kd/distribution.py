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


def _replica_context():
    """The `tf.distribute` replica context when this code runs in one of
    several replicas (TensorFlow only), else `None`."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync < 2:
        return None
    return context


def global_sum(value):
    """`value` summed over the replicas of the current `tf.distribute`
    strategy, in each replica (`value` itself elsewhere).

    A token mean is `sum(w * loss) / sum(w)` over the global batch; each
    replica holds its own tokens, so each divides its own sum by the global
    sum of weights, and the replicas' gradients add up to the gradient of
    the global mean."""
    context = _replica_context()
    if context is None:
        return value
    import tensorflow as tf

    return context.all_reduce(tf.distribute.ReduceOp.SUM,
                              keras.ops.stop_gradient(value))


def tracker_update(value, weight, batch_size):
    """`(value, sample_weight)` for a term's loss tracker, such that each
    replica's tracker holds the value of the global batch.

    Keras logs the mean over replicas of each replica's tracker. A mean
    over the batch (`weight` is `None`) is divided by the replica count in
    the loss, so the tracker takes it times the replica count, weighted by
    the batch size. A token mean (`weight` is the replica's token count,
    the term's `log_weight`) is `local sum / global count` in each replica:
    the tracker takes its sum over the replicas, the global token mean,
    weighted by the global token count, so that an epoch's value is the
    mean over the epoch's tokens. Outside `tf.distribute`, `(value,
    weight)`, or `(value, batch_size)` without `weight`."""
    if weight is None:
        return unscale_for_replicas(value), batch_size
    return global_sum(value), global_sum(weight)


def scale_for_replicas(value):
    """A per-replica share of a global mean: `value / replicas`."""
    n = replicas_in_sync()
    return value / n if n > 1 else value


def unscale_for_replicas(value):
    """The global mean from a per-replica share: `value * replicas`."""
    n = replicas_in_sync()
    return value * n if n > 1 else value


def check_placement(distiller):
    """Checks, before a step is compiled, that every variable of the
    distiller can take part in the current `keras.distribution`.

    Under a `keras.distribution` (JAX), each model keeps the layout it was
    built with: a teacher built under `ModelParallel(layout_map=...)
    .scope()` stays sharded, a student built under another scope on the
    same devices keeps its own layout. One compiled step reads them all,
    so they must all live on the distribution's devices. A model built
    outside any distribution sits on one device, and JAX would refuse the
    step with "incompatible devices"; this names the model and the
    variable instead.

    Raises:
        ValueError: a `keras.distribution` is set on a backend other than
            JAX, or a variable lives on devices outside the
            distribution's mesh (a model built outside its scope).
    """
    distribution = keras.distribution.distribution()
    if distribution is None:
        return
    backend = keras.backend.backend()
    if backend != "jax":
        raise ValueError(
            f"A `keras.distribution` ({type(distribution).__name__}) is set "
            f"but the backend is {backend!r}: Keras implements "
            "`keras.distribution` on JAX only. On TensorFlow, train under "
            "a `tf.distribute` strategy (`MirroredStrategy`, "
            "`MultiWorkerMirroredStrategy`); on PyTorch keras-kd trains on "
            "one device (docs/backends.md).")
    mesh_devices = set(distribution.device_mesh.backend_mesh.devices.flat)
    teachers = distiller.teacher
    teachers = teachers if isinstance(teachers, list) else [teachers]
    owners = [(f"teacher '{t.name}'", t) for t in teachers]
    owners.append((f"student '{distiller.student.name}'",
                   distiller.student))
    owners.append(("distiller (its adapters, trackers and optimizer)",
                   distiller))
    seen = set()
    for owner, model in owners:
        for variable in model.variables:
            if id(variable) in seen:
                continue
            seen.add(id(variable))
            value = variable.value
            devices = getattr(getattr(value, "sharding", None),
                              "device_set", None)
            if devices is None or devices == mesh_devices:
                continue
            raise ValueError(
                f"The {owner} has variable '{variable.path}' on "
                f"{len(devices)} device(s) ({_devices_text(devices)}), but "
                f"the current `keras.distribution` "
                f"({type(distribution).__name__}) runs the step on "
                f"{len(mesh_devices)} ({_devices_text(mesh_devices)}). "
                "Every model of one "
                "`Distiller` must be built on the distribution's devices: "
                "build each one under a distribution's `scope()` on the "
                "same `DeviceMesh` (e.g. `with keras.distribution."
                "ModelParallel(layout_map=teacher_layouts).scope(): "
                "teacher = ...`), and build the `Distiller` under the "
                "training distribution's `scope()` (docs/distributed.md).")


def _devices_text(devices, shown=4):
    names = sorted(str(d) for d in devices)
    more = f", ... {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
