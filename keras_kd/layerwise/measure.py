"""Measuring the divergence between student and teacher maps at paired
layers: taps over the teachers and the student, the signals' maps, and the
divergence of every pair.

The paper (Kokane, Uddin & Xu, arXiv:2407.04871) was not available in full;
the choices below that it does not state are the library's reading and are
documented where they are made:

- The divergence of layer `l` is the batch mean of the Jensen-Shannon
  divergence (natural log, so in `[0, ln 2]`) between the normalized student
  and teacher maps, after average-pooling the larger map to the smaller
  spatial size. With several teachers it is the mean of that divergence
  over the teachers that have the pair's teacher layer.
- Maps are computed in inference mode (`training=False`) on extra forward
  passes that only run on update steps, so batch-norm statistics and dropout
  are unaffected. The "top logit" of the Jacobian and Hessian signals is the
  output of the class the teachers rank first (the argmax of their averaged
  outputs), for every model, so that the maps answer the same question.
- The Hessian is that of the cross-entropy of that class,
  `-log softmax(z)[c]`, with respect to the layer's activations: the Hessian
  of a logit itself is zero almost everywhere in networks built from ReLU,
  max-pooling and linear layers. Its diagonal is estimated with Hutchinson's
  method, `diag(H) ~ mean_k v_k * (H v_k)` with Rademacher probes `v_k`. All
  paired layers are probed together (one Hessian-vector product per probe);
  cross-layer blocks average out because independent probes are
  uncorrelated. Probes are drawn with a seed made of a constant and the
  optimizer's iteration count (restored with the optimizer), so resumed
  training repeats them. (A `keras.random.SeedGenerator` would not do:
  Keras does not save its state.)

How the measured divergences become learning rates is in
`keras_kd.layerwise.routing`.
"""

import keras
from keras import ops

from keras_kd.layerwise.autodiff import (
    hutchinson_diagonals, joint_top_logit_gradients, single_output,
)
from keras_kd.layerwise.perturb import segments_for
from keras_kd.layerwise.signals import collapse_channels, map_divergence
from keras_kd.taps import Tap

_PROBE_SEED = 1337


def probe_seed(iteration):
    """The seed of the Hessian signal's probes at an iteration: the same
    iteration draws the same probes, so resumed training (which restores
    the optimizer's iteration count) repeats them."""
    return ops.stack([ops.convert_to_tensor(_PROBE_SEED, "int32"),
                      ops.cast(iteration, "int32")])


def check_shapes(pair, t_shape, s_shape, teacher_name=None):
    """Raises a `ValueError` naming the pair when its maps cannot be
    compared: different ranks, a rank other than 2, 3 or 4, different
    units at rank 2, or spatial sizes that do not divide each other."""
    s_name, t_name = pair
    of = "" if teacher_name is None else f" of '{teacher_name}'"
    where = (
        f"pair (student layer '{s_name}' {s_shape}, teacher layer "
        f"'{t_name}'{of} {t_shape})"
    )
    if len(t_shape) != len(s_shape) or len(s_shape) not in (2, 3, 4):
        raise ValueError(
            f"Cannot compare the maps of the {where}: both outputs "
            "must have the same rank, 2 (batch, units), 3 (batch, "
            "steps, channels) or 4 (batch, height, width, channels)."
        )
    if len(s_shape) == 2:
        if t_shape[1] != s_shape[1]:
            raise ValueError(
                f"Cannot compare the maps of the {where}: rank-2 "
                "outputs are compared unit by unit and need the "
                "same number of units."
            )
        return
    for t, s in zip(t_shape[1:-1], s_shape[1:-1]):
        if t and s and max(t, s) % min(t, s):
            raise ValueError(
                f"Spatial sizes cannot be pooled to a common size "
                f"for the {where}: each size must divide the other."
            )


def check_output(model, role, signal):
    """Raises a `ValueError` unless the model has a single
    `(batch, classes)` output, as the Jacobian and Hessian signals need."""
    outputs = model.outputs
    if len(outputs) != 1 or len(outputs[0].shape) != 2:
        raise ValueError(
            f"The '{signal}' signal needs a single "
            f"output of shape (batch, classes), but the {role} "
            f"model '{model.name}' outputs "
            f"{[tuple(o.shape) for o in outputs]}. Use "
            "signal='attention', which reads activations only."
        )


class Measurement:
    """The maps and divergences of the pairs of a `LayerwiseLearningRate`
    on a batch: one `keras_kd.taps.Tap` over the student and, asked of the
    distiller's teachers (`Teachers.layer_taps`), one over each teacher
    (reading the teacher layers of the pairs it has). The pairs are checked
    against the models when it is built.

    Args:
        config: the `LayerwiseLearningRate` (its `pairs`, `signal`, `p` and
            `hutchinson_samples` are read).
        teachers: the distiller's `keras_kd.teachers.Teachers`.
        student: the student `keras.Model`.

    Example:

    ```python
    measurement = Measurement(config, Teachers([teacher], []), student)
    divergences = measurement.divergences(x)  # shape (pairs,)
    ```
    """

    def __init__(self, config, teachers, student):
        self.config = config
        self.student = Tap(student, config.student_layers, "student")
        # Per pair, the (teacher index, position in its tap) of every
        # teacher that has the pair's teacher layer.
        self.teachers, self.sources = teachers.layer_taps(
            [t_name for _, t_name in config.pairs])
        teachers = teachers.teachers
        for (s_name, t_name), found in zip(config.pairs, self.sources):
            if not found:
                raise ValueError(
                    f"No teacher has the layer '{t_name}' paired with the "
                    f"student layer '{s_name}'; teachers: "
                    f"{[model.name for model in teachers]}. Pair a layer "
                    "that at least one teacher has."
                )
        for p, found in enumerate(self.sources):
            for t, k in found:
                check_shapes(
                    config.pairs[p], self.teachers[t].feature_shapes[k],
                    self.student.feature_shapes[p],
                    teachers[t].name if len(teachers) > 1 else None)
        if config.signal != "attention":
            for model in teachers:
                check_output(model, "teacher", config.signal)
            check_output(student, "student", config.signal)
            # The perturbed forward passes, built now rather than in the
            # first traced step.
            for tap in self.teachers + [self.student]:
                if tap.extractor is not None:
                    segments_for(tap)

    def signal_maps(self, x, seed=None):
        """The collapsed teacher and student maps of every pair on batch `x`.

        Args:
            x: a batch of inputs.
            seed: for the Hessian signal, the seed of the probes, a tensor
                of shape `(2,)` (`probe_seed(iteration)`, as training uses);
                `None` for `probe_seed(0)`.

        Returns:
            `(teacher_maps, student_maps)`, lists with one entry per pair,
            as returned by `collapse_channels` (before pooling and
            normalization). With several teachers a teacher entry is the
            list of the maps of the teachers that have the pair's teacher
            layer (a single map when one teacher has it).
        """
        teachers, student_tap = self.teachers, self.student
        signal, p = self.config.signal, self.config.p
        x = keras.tree.map_structure(ops.convert_to_tensor, x)
        roles = ["teacher"] * len(teachers)
        if signal == "attention":
            teacher = [tap(x, training=False)[1] for tap in teachers]
            student = student_tap(x, training=False)[1]
        elif signal == "jacobian":
            classes, teacher = joint_top_logit_gradients(
                teachers, x, roles=roles)
            _, (student,) = joint_top_logit_gradients(
                [student_tap], x, classes, ["student"])
        else:
            outputs = [
                single_output(tap(x, training=False)[0], "teacher",
                              tap.model)
                for tap in teachers
            ]
            mean = sum(outputs) / float(len(outputs))
            classes = ops.stop_gradient(ops.argmax(mean, axis=-1))
            if seed is None:
                seed = probe_seed(0)
            estimates = hutchinson_diagonals(
                teachers + [student_tap], x, classes,
                self.config.hutchinson_samples, seed,
                roles + ["student"])
            teacher, student = estimates[:-1], estimates[-1]
        teacher_maps = []
        for found in self.sources:
            maps = [collapse_channels(ops.stop_gradient(teacher[t][k]), p)
                    for t, k in found]
            teacher_maps.append(maps[0] if len(maps) == 1 else maps)
        student_maps = [collapse_channels(ops.stop_gradient(s), p)
                        for s in student]
        return teacher_maps, student_maps

    def divergences(self, x, seed=None):
        """The divergence of every pair on batch `x`, shape `(pairs,)`:
        with several teachers, the mean over the teachers that have the
        pair's teacher layer."""
        teacher, student = self.signal_maps(x, seed)
        divergences = []
        for t_maps, s_map in zip(teacher, student):
            if not isinstance(t_maps, list):
                t_maps = [t_maps]
            divergences.append(
                sum(map_divergence(t, s_map) for t in t_maps)
                / float(len(t_maps)))
        return ops.stack(divergences)
