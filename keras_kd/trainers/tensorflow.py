"""The Distiller's trainer on TensorFlow: `tf.GradientTape`.

The teachers run outside the tape; the student's one forward pass and every
loss run inside it. With local modules, each module runs under its own tape
and the next module starts only once the previous module's gradients exist
(a control dependency in graph mode), so its activations are released
first.
"""

import tensorflow as tf

from keras_kd.batches import unpack
from keras_kd.trainers.base import DistillerTrainer


def _multi_worker(strategy):
    """Whether `strategy` spans several workers (TF_CONFIG with more than one
    chief or worker task)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return False
    spec = resolver.cluster_spec().as_dict()
    return len(spec.get("chief", [])) + len(spec.get("worker", [])) > 1


def _for_strategy(logs, strategy):
    """Logs as Keras' multi-worker reduction expects them.

    Keras (checked on 3.12 to 3.15) averages each log over the replicas of
    a multi-worker strategy with `strategy.reduce("MEAN", value, axis=0)`,
    which needs an axis 0 (keras-team/keras#20585): each scalar gets one.
    """
    if strategy is None or not _multi_worker(strategy):
        return logs
    return {k: tf.reshape(v, (1,)) for k, v in logs.items()}


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
        x, y, sample_weight = unpack(data)
        step = self.distillation_step
        teacher = step.teacher_outputs(x, augment=True)
        x_student = step.student_inputs(x, augment=True)
        routing = self._gradient_routing()
        if routing is not None:
            routing.refresh(x, self.optimizer.iterations)
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
        return _for_strategy(logs, self.distribute_strategy)

    def _train_modules(self, data):
        """Each module forward and backward under its own tape, in turn;
        then one optimizer update of all modules' variables."""
        chain = self._module_chain()

        def differentiate(k, run):
            with tf.GradientTape() as tape:
                module = run()
                scaled = self.optimizer.scale_loss(module.losses.total)
            gradients = tape.gradient(scaled, chain.module_variables(k))
            del tape  # releases this module's activations
            return module, gradients

        run = self._modules_forward(data, training=True, sequence=_after,
                                    differentiate=differentiate)
        logs = self._record_modules(run)
        # In the distiller's variable order, as the optimizer was built.
        variables = self.trainable_variables
        self._apply_gradients([run.gradients[id(v)] for v in variables],
                              variables)
        return _for_strategy(logs, self.distribute_strategy)

    def test_step(self, data):
        return _for_strategy(self._stateful_test_step(data),
                             self.distribute_strategy)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras (checked on 3.12 to 3.15) reads the shapes of the first
        # batch by reducing a distributed batch with MEAN across replicas,
        # which fails under MultiWorkerMirroredStrategy
        # (keras-team/keras#20585). One replica's batch has those shapes.
        if iterator is not None and self.distribute_strategy is not None:
            strategy = self.distribute_strategy
            for _, _, batches in iterator:
                try:
                    batch = next(batches)
                except StopIteration:
                    raise ValueError(
                        f"The data given to the distiller '{self.name}' is "
                        "empty: it yielded no batch. Pass a data set with "
                        "at least one sample.") from None
                data_batch = tf.nest.map_structure(
                    lambda value: strategy.experimental_local_results(
                        value)[0]
                    if isinstance(value, tf.distribute.DistributedValues)
                    else value,
                    batch)
                break
            iterator = None
        return super()._maybe_symbolic_build(iterator=iterator,
                                             data_batch=data_batch)

