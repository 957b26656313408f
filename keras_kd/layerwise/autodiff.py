"""Gradients with respect to intermediate activations, for the Jacobian and
Hessian signals, on TensorFlow, JAX and PyTorch.

A model's activations at its paired layers are not inputs, and JAX can only
differentiate a function with respect to its arguments. So the model is run
with a tensor `eps_k` added to the output of each paired layer `k` (zeros
of the activation's shape; `keras_kd.layerwise.perturb`): the derivative of
the output with respect to `eps_k` at zero is its derivative with respect to
the activation.

Per backend, in one small set of functions (each imports its backend when
it runs): TensorFlow `tf.GradientTape` (nested for Hessian-vector
products), JAX `jax.value_and_grad` and `jax.linearize` (forward over
reverse), PyTorch `torch.autograd.grad(create_graph=True)`.
"""

import keras
from keras import ops

from keras_kd.layerwise.perturb import perturbed_call


def single_output(outputs, role, model):
    flat = keras.tree.flatten(outputs)
    if len(flat) != 1:
        raise ValueError(
            f"The {role} model '{model.name}' has {len(flat)} outputs; the "
            "Jacobian and Hessian signals need a single output of shape "
            "(batch, classes)."
        )
    return ops.cast(flat[0], "float32")


def class_outputs(outputs, classes):
    """`outputs[i, classes[i]]` for every sample."""
    index = ops.expand_dims(ops.cast(classes, "int32"), -1)
    return ops.squeeze(ops.take_along_axis(outputs, index, axis=-1), -1)


def cross_entropy_at(outputs, classes):
    """`-sum_i log softmax(outputs_i)[classes_i]`."""
    return -ops.sum(class_outputs(ops.log_softmax(outputs, axis=-1),
                                  classes))


# Shapes of the perturbations.

def feature_shapes(tap, x):
    """The shapes of the tapped features for the batch `x` (the batch size
    may be a tensor); unknown sizes are read from a forward pass."""
    shapes = [tuple(s) for s in tap.feature_shapes]
    if any(None in s[1:] for s in shapes):
        _, features = tap(x, training=False)
        return [tuple(ops.shape(f)) for f in features]
    batch = ops.shape(keras.tree.flatten(x)[0])[0]
    return [(batch,) + s[1:] for s in shapes]


def zeros_for(tap, x):
    """One float32 zero tensor per tapped layer, shaped like its output."""
    return [ops.zeros(shape, "float32") for shape in feature_shapes(tap, x)]


# Differentiation, per backend.

def _backend():
    return keras.backend.backend()


def value_and_gradients(fn, args):
    """`(aux, gradients)` where `fn(args)` returns `(value, aux)`, `value`
    a scalar, and `gradients[k]` is d value / d `args[k]` (`None` where
    the backend finds no dependence: TensorFlow and PyTorch)."""
    backend = _backend()
    if backend == "tensorflow":
        import tensorflow as tf

        args = [tf.convert_to_tensor(a) for a in args]
        with tf.GradientTape() as tape:
            tape.watch(args)
            value, aux = fn(args)
        return aux, tape.gradient(value, args)
    if backend == "jax":
        import jax

        (_, aux), gradients = jax.value_and_grad(fn, has_aux=True)(
            list(args))
        return aux, list(gradients)
    if backend == "torch":
        import torch

        with torch.enable_grad():
            args = [ops.convert_to_tensor(a).detach().requires_grad_(True)
                    for a in args]
            value, aux = fn(args)
            gradients = torch.autograd.grad(value, args, allow_unused=True)
        return aux, [None if g is None else g.detach() for g in gradients]
    raise NotImplementedError(
        f"Gradients with respect to activations need TensorFlow, JAX or "
        f"PyTorch; Keras is running on '{backend}'."
    )


def hessian_products(fn, args, vectors):
    """Hessian-vector products of the scalar `fn(args)`.

    Returns:
        `(gradients, products)`: d fn / d `args` (as
        `value_and_gradients`), and for each `vector` of `vectors` (one
        tensor per argument) the list `H @ vector`, one tensor per argument
        (zeros where there is no dependence).
    """
    backend = _backend()
    if backend == "tensorflow":
        import tensorflow as tf

        args = [tf.convert_to_tensor(a) for a in args]
        with tf.GradientTape(persistent=len(vectors) > 1) as outer:
            outer.watch(args)
            with tf.GradientTape() as inner:
                inner.watch(args)
                value = fn(args)
            gradients = inner.gradient(value, args)
            dots = [_dot(gradients, vector) for vector in vectors]
        products = [
            outer.gradient(dot, args,
                           unconnected_gradients=tf.UnconnectedGradients.ZERO)
            for dot in dots
        ]
        del outer
        return gradients, products
    if backend == "jax":
        import jax

        gradients, hvp = jax.linearize(jax.grad(fn), list(args))
        return list(gradients), [list(hvp(list(v))) for v in vectors]
    if backend == "torch":
        import torch

        with torch.enable_grad():
            args = [ops.convert_to_tensor(a).detach().requires_grad_(True)
                    for a in args]
            value = fn(args)
            gradients = torch.autograd.grad(value, args, create_graph=True,
                                            allow_unused=True)
            products = []
            for vector in vectors:
                dot = _dot(gradients, vector)
                if not isinstance(dot, torch.Tensor) or \
                        not dot.requires_grad:
                    products.append([torch.zeros_like(a) for a in args])
                    continue
                product = torch.autograd.grad(dot, args, retain_graph=True,
                                              allow_unused=True)
                products.append([torch.zeros_like(a) if p is None
                                 else p.detach()
                                 for a, p in zip(args, product)])
        return [None if g is None else g.detach() for g in gradients], \
            products
    raise NotImplementedError(
        f"Hessian-vector products need TensorFlow, JAX or PyTorch; Keras is "
        f"running on '{backend}'."
    )


def _dot(gradients, vector):
    return sum(ops.sum(ops.cast(g, "float32") * v)
               for g, v in zip(gradients, vector) if g is not None)


def rademacher(shape, seed, salt):
    """A float32 tensor of independent +-1 entries.

    Args:
        shape: the shape (its first entry may be a tensor).
        seed: an integer seed tensor of shape `(2,)`.
        salt: a Python int that gives this tensor its own stream.
    """
    backend = _backend()
    if backend == "tensorflow":
        import tensorflow as tf

        seed = tf.cast(seed, tf.int64)
        pair = tf.stack([seed[0], seed[1] * 1_000_003 + salt])
        pair = tf.cast(tf.math.floormod(pair, 2**31 - 1), tf.int32)
        uniform = tf.random.stateless_uniform(tf.stack(list(shape)),
                                              seed=pair)
        return tf.where(uniform < 0.5, -1.0, 1.0)
    if backend == "jax":
        import jax

        key = jax.random.fold_in(seed.astype("uint32"), salt)
        return jax.random.rademacher(key, tuple(shape), dtype="float32")
    if backend == "torch":
        import torch

        values = [int(v) for v in ops.convert_to_numpy(seed)]
        generator = torch.Generator()
        generator.manual_seed(
            (values[0] * 1_000_003 + values[1] * 1009 + salt) % (2**63 - 1))
        bits = torch.randint(0, 2, tuple(int(s) for s in shape),
                             generator=generator)
        return ops.convert_to_tensor(bits.float() * 2.0 - 1.0)
    raise NotImplementedError(
        f"Random probes need TensorFlow, JAX or PyTorch; Keras is running on "
        f"'{backend}'."
    )


def check_connected(gradients, names, role):
    for gradient, name in zip(gradients, names):
        if gradient is None:
            raise ValueError(
                f"The output of the {role} model does not depend on its "
                f"layer '{name}' through differentiable operations, so no "
                "Jacobian or Hessian map can be computed there. Pair layers "
                "that lie on the path to the model's output."
            )


# The signals of one model or of several together.

def _split(flat, taps):
    out, start = [], 0
    for tap in taps:
        count = len(tap.layer_names)
        out.append(flat[start:start + count])
        start += count
    return out


def top_logit_gradients(tap, x, classes=None, role="student"):
    """Gradient of the top logit with respect to tapped activations.

    Args:
        tap: a `keras_kd.taps.Tap` over the model and its paired layers.
        x: a batch of inputs.
        classes: integer class per sample whose logit is differentiated;
            `None` for the model's own argmax.
        role: `"teacher"` or `"student"`, for error messages.

    Returns:
        `(classes, gradients)`: the classes used and one gradient per tapped
        layer, each shaped like that layer's output.
    """
    classes, gradients = joint_top_logit_gradients([tap], x, classes,
                                                   [role])
    return classes, gradients[0]


def joint_top_logit_gradients(taps, x, classes=None, roles=None):
    """`top_logit_gradients` of several models in one backward pass.

    With `classes=None` the class of a sample is the argmax of the models'
    averaged outputs (the teachers' ensemble); every model differentiates
    its own output for that class.

    Returns:
        `(classes, gradients)` with one list of gradients per tap.
    """
    roles = roles or ["model"] * len(taps)
    x = keras.tree.map_structure(ops.convert_to_tensor, x)
    eps = [e for tap in taps for e in zeros_for(tap, x)]

    def target(flat):
        outputs = [single_output(perturbed_call(tap, x, e)[0], role,
                                 tap.model)
                   for tap, e, role in zip(taps, _split(flat, taps), roles)]
        chosen = classes
        if chosen is None:
            mean = ops.stop_gradient(sum(outputs) / float(len(outputs)))
            chosen = ops.argmax(mean, axis=-1)
        return sum(ops.sum(class_outputs(o, chosen)) for o in outputs), \
            chosen

    chosen, gradients = value_and_gradients(target, eps)
    gradients = _split(list(gradients), taps)
    for tap, grads, role in zip(taps, gradients, roles):
        check_connected(grads, tap.layer_names, role)
    return chosen, gradients


def hessian_vector_products(tap, x, classes, probes, role="student"):
    """Hessian-vector products of the cross-entropy of `classes` with
    respect to tapped activations.

    The Hessian is taken jointly over all tapped layers: for probes
    `v = (v_1, ..., v_L)` the result for layer `l` is `sum_k H_lk v_k`.

    Args:
        tap: a `keras_kd.taps.Tap` over the model and its paired layers.
        x: a batch of inputs.
        classes: integer class per sample.
        probes: a list with one list per probe, each holding one tensor per
            tapped layer, shaped like that layer's output.
        role: `"teacher"` or `"student"`, for error messages.

    Returns:
        One list per probe of one tensor per tapped layer.
    """
    return joint_hessian_vector_products([tap], x, classes, [probes],
                                         [role])[0]


def joint_hessian_vector_products(taps, x, classes, probes, roles=None):
    """`hessian_vector_products` of several models in one pass: the sum of
    their cross-entropies has a block-diagonal Hessian, one block per model.

    Args:
        probes: per tap, its list of probes (as `hessian_vector_products`);
            every tap has the same number of probes.

    Returns:
        Per tap, one list per probe of one tensor per tapped layer.
    """
    roles = roles or ["model"] * len(taps)
    x = keras.tree.map_structure(ops.convert_to_tensor, x)
    eps = [e for tap in taps for e in zeros_for(tap, x)]
    samples = len(probes[0])
    vectors = [[ops.convert_to_tensor(v, "float32") for per_tap in probes
                for v in per_tap[k]]
               for k in range(samples)]

    def target(flat):
        return sum(
            cross_entropy_at(single_output(perturbed_call(tap, x, e)[0],
                                           role, tap.model), classes)
            for tap, e, role in zip(taps, _split(flat, taps), roles))

    gradients, products = hessian_products(target, eps, vectors)
    for tap, grads, role in zip(taps, _split(list(gradients), taps), roles):
        check_connected(grads, tap.layer_names, role)
    per_probe = [_split(list(p), taps) for p in products]
    return [[per_probe[k][t] for k in range(samples)]
            for t in range(len(taps))]


def hutchinson_diagonals(taps, x, classes, samples, seed, roles=None):
    """Hutchinson estimates `mean_k v_k * (H v_k)` of the Hessian diagonal
    at every tapped layer of every model, with Rademacher probes `v_k`
    drawn from `seed` (see `joint_hessian_vector_products`).

    Returns:
        Per tap, one estimate per tapped layer.
    """
    x = keras.tree.map_structure(ops.convert_to_tensor, x)
    probes = []
    for t, tap in enumerate(taps):
        shapes = feature_shapes(tap, x)
        probes.append([
            [rademacher(shape, seed, 1_000_003 * t + 1009 * k + index)
             for index, shape in enumerate(shapes)]
            for k in range(samples)
        ])
    products = joint_hessian_vector_products(taps, x, classes, probes, roles)
    diagonals = []
    for tap_probes, tap_products in zip(probes, products):
        estimates = []
        for index in range(len(tap_probes[0]) if tap_probes else 0):
            total = sum(probe[index] * ops.cast(product[index], "float32")
                        for probe, product in zip(tap_probes, tap_products))
            estimates.append(total / float(samples))
        diagonals.append(estimates)
    return diagonals
