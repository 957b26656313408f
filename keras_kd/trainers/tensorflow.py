"""The Distiller's trainer on TensorFlow: `tf.GradientTape`.

The teachers run outside the tape; the student's one forward pass and every
loss run inside it. With local modules, each module runs under its own tape
and the next module starts only once the previous module's gradients exist
(a control dependency in graph mode), so its activations are released
first.
"""

import keras
import tensorflow as tf

from keras_kd.trainers.base import DistillerTrainer


def _after(value, after):
    """`value` computed no earlier than the tensors in `after` (graph mode;
    eager execution is already in program order)."""
    deps = [getattr(t, "values", t) for t in after if t is not None]
    if not deps or tf.executing_eagerly():
        return value
    with tf.control_dependencies(deps):
        return tf.nest.map_structure(tf.identity, value)


class TensorFlowTrainer(DistillerTrainer):
    """`train_step(data)` and `test_step(data)` on TensorFlow."""

    def train_step(self, data):
        if self._module_chain() is not None:
            return self._train_modules(data)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        step = self.distillation_step
        teacher = step.teacher_outputs(x, augment=True)
        x_student = step.student_inputs(x, augment=True)
        routing = self._gradient_routing()
        if routing is not None:
            routing.before_step(x, self.optimizer.iterations)
        with tf.GradientTape() as tape:
            outcome = step(x_student, y, sample_weight, teacher,
                           training=True)
            scaled = self.optimizer.scale_loss(outcome.losses.total)
        variables = self.trainable_variables
        gradients = tape.gradient(scaled, variables)
        logs = self._record(x, y, sample_weight, outcome.student.outputs,
                            outcome.losses, teacher, outcome.student)
        self._apply_gradients(gradients, variables)
        return logs

    def _train_modules(self, data):
        """Each module forward and backward under its own tape, in turn;
        then one optimizer update of all modules' variables."""
        chain = self._module_chain()

        def differentiate(k, run):
            with tf.GradientTape() as tape:
                output, losses = run()
                scaled = self.optimizer.scale_loss(losses.total)
            gradients = tape.gradient(scaled, chain.module_variables(k))
            del tape  # releases this module's activations
            return output, losses, gradients

        run = self._modules_forward(data, training=True, sequence=_after,
                                    differentiate=differentiate)
        logs = self._record(run.x, run.y, run.sample_weight, run.y_pred,
                            run.losses)
        # In the distiller's variable order, as the optimizer was built.
        variables = self.trainable_variables
        self._apply_gradients([run.gradients[id(v)] for v in variables],
                              variables)
        return logs

    def test_step(self, data):
        return self._stateful_test_step(data)

