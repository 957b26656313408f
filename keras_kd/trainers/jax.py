"""The Distiller's trainer on JAX: a stateless `train_step(state, data)`
built on `jax.value_and_grad`, as Keras' own JAX trainer.

Every piece of state a step changes goes in as a value and comes back as a
value: the trainable variables (through the optimizer), the non-trainable
ones (batch-norm moving statistics, the seed generators of augmentation
layers, layer-wise divergences), the optimizer's (layer-wise scales
included) and the metrics'. Each part of
the step runs in a `keras.StatelessScope` that maps every variable of the
distiller to its current value, so nothing is read from, or written to, a
variable directly; under `jit` such state would be silently frozen.
"""

import jax
import keras

from keras_kd.trainers.base import DistillerTrainer, merge_losses, unpack


class JAXTrainer(DistillerTrainer):
    """`train_step(state, data)` and `test_step(state, data)` on JAX."""

    def _stateless(self, fn, trainable, non_trainable, metrics=None):
        """Runs `fn()` with the distiller's variables read from the given
        values; returns `(fn(), new non-trainable values, new metrics
        values)` (the metrics `None` when not given)."""
        variables = self.non_trainable_variables
        mapping = list(zip(self.trainable_variables, trainable))
        mapping += list(zip(variables, non_trainable))
        if metrics is not None:
            metric_variables = self.metrics_variables
            mapping += list(zip(metric_variables, metrics))
        with keras.StatelessScope(state_mapping=mapping,
                                  collect_losses=True) as scope:
            out = fn()

        def current(refs, values):
            new = [scope.get_current_value(v) for v in refs]
            return [v if n is None else n for v, n in zip(values, new)]

        non_trainable = current(variables, non_trainable)
        if metrics is not None:
            metrics = current(metric_variables, metrics)
        return out, non_trainable, metrics

    def _before_step(self, routing, x, trainable, non_trainable,
                     optimizer_values):
        """`routing.before_step` with the distiller's and the optimizer's
        variables read from the given values (layer-wise learning rates
        set the optimizer's scales); returns their new values."""
        groups = [(self.trainable_variables, trainable),
                  (self.non_trainable_variables, non_trainable),
                  (self.optimizer.variables, optimizer_values)]
        mapping = [pair for refs, values in groups
                   for pair in zip(refs, values)]
        with keras.StatelessScope(state_mapping=mapping) as scope:
            routing.before_step(x, self.optimizer.iterations)
        new = []
        for refs, values in groups[1:]:
            current = [scope.get_current_value(v) for v in refs]
            new.append([v if n is None else n
                        for v, n in zip(values, current)])
        return new

    def _scaled(self, loss, optimizer_values):
        """`optimizer.scale_loss(loss)` with the optimizer's variables read
        from `optimizer_values` (a loss-scale optimizer's scale)."""
        mapping = list(zip(self.optimizer.variables, optimizer_values))
        with keras.StatelessScope(state_mapping=mapping):
            return self.optimizer.scale_loss(loss)

    def train_step(self, state, data):
        if self._module_chain() is not None:
            return self._train_modules(state, data)
        trainable, non_trainable, optimizer_values, metrics = state
        x, y, sample_weight = unpack(data)
        step = self.distillation_step

        # The teachers and the augmentations, outside differentiation.
        (teacher, x_student), non_trainable, _ = self._stateless(
            lambda: (step.teacher_outputs(x, augment=True),
                     step.student_inputs(x, augment=True)),
            trainable, non_trainable)
        routing = self._gradient_routing()
        if routing is not None:
            non_trainable, optimizer_values = self._before_step(
                routing, x, trainable, non_trainable, optimizer_values)

        def loss_fn(trainable, non_trainable, metrics):
            # The metrics too: the compiled loss of a multi-output student
            # updates its per-output loss trackers.
            outcome, non_trainable, metrics = self._stateless(
                lambda: step(x_student, y, sample_weight, teacher,
                             training=True),
                trainable, non_trainable, metrics)
            scaled = self._scaled(outcome.losses.total, optimizer_values)
            return scaled, (outcome, non_trainable, metrics)

        (_, (outcome, non_trainable, metrics)), gradients = \
            jax.value_and_grad(loss_fn, has_aux=True)(
                trainable, non_trainable, metrics)

        # Logs from the weights of this step's forward pass.
        logs, non_trainable, metrics = self._stateless(
            lambda: self._record(x, y, sample_weight,
                                 outcome.student.outputs, outcome.losses,
                                 teacher, outcome.student),
            trainable, non_trainable, metrics)
        if self.trainable_variables:
            trainable, optimizer_values = self.optimizer.stateless_apply(
                optimizer_values, gradients, trainable)
        else:
            self._apply_gradients([], [])  # warns: nothing to train
        return logs, (trainable, non_trainable, optimizer_values, metrics)

    def _train_modules(self, state, data):
        """Local modules: one `jax.value_and_grad` per module, over that
        module's variables only, on the previous module's output with its
        gradient stopped; batch-norm statistics and seeds are threaded from
        module to module. One optimizer update at the end."""
        trainable, non_trainable, optimizer_values, metrics = state
        chain = self._module_chain()
        x, y, sample_weight = unpack(data)
        position = {id(v): i for i, v in enumerate(self.trainable_variables)}
        stream = chain.teacher_stream(x, augment=True)
        h, non_trainable, _ = self._stateless(
            lambda: self.distillation_step.student_inputs(x, augment=True),
            trainable, non_trainable)
        gradients = [None] * len(trainable)
        parts, features = [], {}
        for k in range(chain.num_modules):
            _, non_trainable, _ = self._stateless(
                lambda k=k: stream.advance(k), trainable, non_trainable)
            own = [position[id(v)] for v in chain.module_variables(k)]
            inputs = keras.tree.map_structure(jax.lax.stop_gradient, h)

            def module_loss(values, non_trainable, k=k, own=own,
                            inputs=inputs):
                current = list(trainable)
                for index, value in zip(own, values):
                    current[index] = value
                module, non_trainable, _ = self._stateless(
                    lambda: chain.module_losses(k, inputs, y, sample_weight,
                                                stream, True),
                    current, non_trainable)
                scaled = self._scaled(module.losses.total, optimizer_values)
                return scaled, (module, non_trainable)

            (_, (module, non_trainable)), module_gradients = (
                jax.value_and_grad(module_loss, has_aux=True)(
                    [trainable[i] for i in own], non_trainable))
            for index, gradient in zip(own, module_gradients):
                gradients[index] = gradient
            h = module.output
            parts.append(module.losses)
            features.update(module.diagnostic_features)

        teacher, student = chain.diagnostic_inputs(stream, h, features)
        logs, non_trainable, metrics = self._stateless(
            lambda: self._record(x, y, sample_weight, h, merge_losses(parts),
                                 teacher, student),
            trainable, non_trainable, metrics)
        trainable, optimizer_values = self.optimizer.stateless_apply(
            optimizer_values, gradients, trainable)
        return logs, (trainable, non_trainable, optimizer_values, metrics)

    def test_step(self, state, data):
        trainable, non_trainable, metrics = state
        logs, non_trainable, metrics = self._stateless(
            lambda: self._stateful_test_step(data),
            trainable, non_trainable, metrics)
        return logs, (trainable, non_trainable, metrics)
