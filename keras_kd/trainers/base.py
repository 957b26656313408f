"""What every backend trainer of the `Distiller` shares.

A backend trainer (`tensorflow.py`, `jax.py`, `torch.py`) only
differentiates and applies. Everything else a step does is here, in
`keras.ops`: the teachers' outputs, the student's forward pass and losses
(`keras_kd.step`), the local modules' losses run without gradients, and
the update of the loss trackers, diagnostics and compiled metrics.

The mixin reads these attributes of the model it is mixed into:
`distillation_step` (a `keras_kd.step.DistillationStep`),
`training_extension` (`None` or a `keras_kd.extension.TrainingExtension`),
`diagnostics_feed` (a `keras_kd.diagnostics.Diagnostics`) and the
`loss_trackers` it owns.
"""

import warnings
from typing import NamedTuple

import keras

from keras_kd.batches import unpack
from keras_kd.distribution import tracker_update, unscale_for_replicas
from keras_kd.extension import GradientRouting, ModuleChain
from keras_kd.step import StepLosses, batch_size


class ForwardPass(NamedTuple):
    """One end-to-end forward pass: the batch, the teachers' outputs and
    the `StepOutcome` (student forward and losses)."""

    x: object
    y: object
    sample_weight: object
    teacher: object
    outcome: object


class ModulesPass(NamedTuple):
    """One pass through the local modules: the batch, the last module's
    output, the merged `StepLosses`, `{id(variable): gradient}` when the
    modules were differentiated, and what the diagnostics read."""

    x: object
    y: object
    sample_weight: object
    y_pred: object
    losses: StepLosses
    gradients: dict
    teacher: object
    student: object


def merge_losses(parts):
    """One `StepLosses` from the losses of the local modules: the totals
    summed, the student loss of the module that has it, every term."""
    total = sum(part.total for part in parts)
    student_loss = next((p.student_loss for p in parts
                         if p.student_loss is not None), None)
    terms, weights = {}, {}
    for part in parts:
        terms.update(part.terms)
        weights.update(part.term_weights or {})
    return StepLosses(total, student_loss, terms, weights or None)


class DistillerTrainer:
    """The backend-agnostic half of the Distiller's train and test steps."""

    # Pieces of a step.

    def _module_chain(self):
        extension = self.training_extension
        return extension if isinstance(extension, ModuleChain) else None

    def _gradient_routing(self):
        extension = self.training_extension
        return extension if isinstance(extension, GradientRouting) else None

    def _forward(self, data, training):
        """The teachers' outputs (augmented in training) and the student's
        forward pass and losses, as a `ForwardPass`."""
        x, y, sample_weight = unpack(data)
        step = self.distillation_step
        teacher = step.teacher_outputs(x, augment=training)
        outcome = step(step.student_inputs(x, augment=training), y,
                       sample_weight, teacher, training=training)
        return ForwardPass(x, y, sample_weight, teacher, outcome)

    def _modules_forward(self, data, training, sequence=None,
                         differentiate=None):
        """Runs the local modules in turn; returns a `ModulesPass`.

        Args:
            data: the batch.
            training: the `training` flag of the modules (training steps
                also augment).
            sequence: the backend's ordering primitive (see
                `ModuleChain.teacher_stream`).
            differentiate: `None` (no gradients), or a backend function
                `differentiate(k, run)` that calls `run()` (which returns
                the module's `(output, losses, diagnostic_features)`) under
                its autodiff, and returns `(module step, gradients)` for
                module `k`'s variables. The gradients are passed to
                `sequence` before module `k + 1` starts.
        """
        chain = self._module_chain()
        x, y, sample_weight = unpack(data)
        sequence = sequence or (lambda value, after: value)
        stream = chain.teacher_stream(x, sequence, augment=training)
        h = self.distillation_step.student_inputs(x, augment=training)
        after, parts, gradients, features = [], [], {}, {}
        for k in range(chain.num_modules):
            # The teachers' part for this module runs after the previous
            # module's backward pass, and this module after both.
            ready = stream.advance(k, after)
            inputs = sequence(keras.tree.map_structure(
                keras.ops.stop_gradient, h), list(after) + list(ready))

            def run(k=k, inputs=inputs):
                return chain.module_losses(k, inputs, y, sample_weight,
                                           stream, training)

            if differentiate is None:
                module = run()
            else:
                module, after = differentiate(k, run)
                gradients.update(zip(
                    (id(v) for v in chain.module_variables(k)), after))
            h = module.output
            parts.append(module.losses)
            features.update(module.diagnostic_features)
        teacher, student = chain.diagnostic_inputs(stream, h, features)
        return ModulesPass(x, y, sample_weight, h, merge_losses(parts),
                           gradients, teacher, student)

    def _apply_gradients(self, gradients, variables):
        """Applies the gradients with the compiled optimizer (with
        layer-wise learning rates, a `keras_kd.LayerwiseOptimizer` that
        routes each to its group)."""
        if not variables:
            warnings.warn(
                f"The distiller '{self.name}' has no trainable variables "
                "(is `trainable` False?); the step changes no weight.",
                stacklevel=3,
            )
            return
        self.optimizer.apply_gradients(zip(gradients, variables))

    # Logs.

    @property
    def total_loss_tracker(self):
        """The `Mean` metric of the total loss that `compile` creates (the
        `loss` log), found among the public `metrics`."""
        return next(m for m in self.metrics if m.name == "loss")

    def _record(self, x, y, sample_weight, y_pred, losses, teacher=None,
                student=None):
        """Updates the loss trackers, the diagnostics and the compiled
        metrics with one step, and returns the logs.

        Trainers call it before applying the gradients, so that the
        diagnostics read the weights of the step's forward pass.

        Args:
            x, y, sample_weight: the batch.
            y_pred: the student's final outputs.
            losses: the step's `StepLosses`.
            teacher: the `TeacherOutputs` (for the diagnostics), or `None`.
            student: the `StudentForward` (for the diagnostics), or `None`.
        """
        n = batch_size(x)
        trackers = self.loss_trackers
        self.total_loss_tracker.update_state(
            unscale_for_replicas(losses.total), sample_weight=n)
        if losses.student_loss is not None:
            trackers["student"].update_state(
                unscale_for_replicas(losses.student_loss), sample_weight=n)
        # A token-mean term weighs by its token count, so that its epoch
        # value is the mean over the epoch's tokens.
        weights = losses.term_weights or {}
        for name, value in losses.terms.items():
            value, weight = tracker_update(value, weights.get(name), n)
            trackers[name].update_state(value, sample_weight=weight)
        if teacher is not None and self.diagnostics_feed.metrics:
            self.diagnostics_feed.update(
                teacher, y_pred, student.diagnostic_features, y,
                sample_weight)
        if y is not None:
            logs = self.compute_metrics(x, y, y_pred, sample_weight)
        else:
            # Without labels there is no student loss and no compiled
            # metric.
            metrics = [self.total_loss_tracker]
            metrics += [t for name, t in trackers.items()
                        if name != "student"]
            metrics += self.diagnostics_feed.unlabelled_metrics
            logs = {m.name: m.result() for m in metrics}
        routing = self._gradient_routing()
        if routing is not None:
            logs = {**logs, **routing.logs()}
        return logs

    def _stateful_test_step(self, data):
        """The test step on backends whose variables hold their values
        (TensorFlow, PyTorch): no augmentation, `training=False`."""
        if self._module_chain() is not None:
            return self._record_modules(
                self._modules_forward(data, training=False))
        return self._record_forward(self._forward(data, training=False))

    def _record_modules(self, run):
        """`_record` for a `ModulesPass`."""
        return self._record(run.x, run.y, run.sample_weight, run.y_pred,
                            run.losses, run.teacher, run.student)

    def _record_forward(self, run):
        """`_record` for a `ForwardPass`."""
        outcome = run.outcome
        return self._record(run.x, run.y, run.sample_weight,
                            outcome.student.outputs, outcome.losses,
                            run.teacher, outcome.student)
