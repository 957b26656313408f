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

from keras_kd.batches import unpack
from keras_kd.trainers.base import DistillerTrainer, merge_losses


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

    def _routed(self, fn, trainable, non_trainable, optimizer_values):
        """Runs `fn()` (a gradient routing's `refresh` or `before_step`)
        with the distiller's and the optimizer's variables read from the
        given values; returns their new non-trainable and optimizer
        values."""
        groups = [(self.trainable_variables, trainable),
                  (self.non_trainable_variables, non_trainable),
                  (self.optimizer.variables, optimizer_values)]
        mapping = [pair for refs, values in groups
                   for pair in zip(refs, values)]
        with keras.StatelessScope(state_mapping=mapping) as scope:
            fn()
        new = []
        for refs, values in groups[1:]:
            current = [scope.get_current_value(v) for v in refs]
            new.append([v if n is None else n
                        for v, n in zip(values, current)])
        return new

    def _refresh(self, trainable, non_trainable, optimizer_values, x,
                 due=None):
        """The gradient routing's `refresh` on batch `x`; returns the new
        non-trainable values."""
        routing = self._gradient_routing()
        non_trainable, _ = self._routed(
            lambda: routing.refresh(x, self.optimizer.iterations, due),
            trainable, non_trainable, optimizer_values)
        return non_trainable

    def _iteration(self, optimizer_values):
        """The compiled optimizer's iteration count, read from the given
        optimizer values."""
        mapping = list(zip(self.optimizer.variables, optimizer_values))
        with keras.StatelessScope(state_mapping=mapping):
            return keras.ops.convert_to_tensor(self.optimizer.iterations)

    def make_train_function(self, force=False):
        """Keras' train function, with one change for gradient routing
        (layer-wise learning rates) under `jit`: the routing's `refresh`
        is a compiled program of its own, run only on the steps that
        refresh, decided on the host (`_RefreshSchedule`).

        Inside the step, the refresh would be an `ops.cond`. XLA gives a
        program the memory of every branch of its `cond`s, and on a CPU
        every call allocates that memory anew (large blocks come fresh
        from the operating system, page by page), so every step would pay
        for the buffers of a re-estimation that runs once every
        `update_every` steps; and XLA on a CPU runs gradients inside a
        `cond` branch more slowly than outside one. Under a
        `keras.distribution`, or without `jit`, Keras builds the train
        function as usual, and the step refreshes inside.
        """
        if self.train_function is not None and not force:
            return
        routing = self._gradient_routing()
        if (routing is None or self.run_eagerly or not self.jit_compile
                or keras.distribution.distribution() is not None):
            super().make_train_function(force=force)
            return
        refresh = jax.jit(
            lambda *args: self._refresh(*args, due=True), donate_argnums=1)
        train = jax.jit(
            lambda state, data: self._train_step(state, data, refresh=False),
            donate_argnums=0)
        iteration = jax.jit(self._iteration)
        schedule = _RefreshSchedule(
            routing.refresh_due, lambda values: int(iteration(values)))

        def one_step(state, data):
            trainable, non_trainable, optimizer_values, metrics = state
            if schedule.due(optimizer_values):
                data = jax.device_put(data)  # once, for both programs
                x = unpack(data)[0]
                non_trainable = refresh(trainable, non_trainable,
                                        optimizer_values, x)
            logs, state = train(
                (trainable, non_trainable, optimizer_values, metrics), data)
            schedule.stepped(state[2])
            return logs, state

        def train_function(state, iterator):
            logs, state = one_step(state, next(iterator))
            for _ in range(self.steps_per_execution - 1):
                try:
                    data = next(iterator)
                except StopIteration:
                    break
                logs, state = one_step(state, data)
            return logs, state

        self.train_function = train_function

    def _scaled(self, loss, optimizer_values):
        """`optimizer.scale_loss(loss)` with the optimizer's variables read
        from `optimizer_values` (a loss-scale optimizer's scale)."""
        mapping = list(zip(self.optimizer.variables, optimizer_values))
        with keras.StatelessScope(state_mapping=mapping):
            return self.optimizer.scale_loss(loss)

    def train_step(self, state, data):
        return self._train_step(state, data, refresh=True)

    def _train_step(self, state, data, refresh):
        """The step; `refresh=False` leaves the gradient routing's
        `refresh` to a program of its own (`make_train_function`)."""
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
            if refresh:
                non_trainable = self._refresh(
                    trainable, non_trainable, optimizer_values, x)
            non_trainable, optimizer_values = self._routed(
                lambda: routing.before_step(x, self.optimizer.iterations),
                trainable, non_trainable, optimizer_values)

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


class _RefreshSchedule:
    """Decides on the host which training steps run the gradient routing's
    refresh, reading the optimizer's iteration count from the device only
    on some steps (a read waits for the previous step to finish).

    It predicts the count as one more per step. The true count never runs
    ahead of the prediction: a step adds one at most (none when a
    loss-scale optimizer skips a step). So reading the true count whenever the prediction is
    due, and on the step after every refresh (the count may not have
    moved), finds every step that `refresh_due` selects. The count is
    read too whenever the optimizer values did not come from the previous
    step (a new epoch, a callback that read the variables, a restore).

    Args:
        refresh_due: `refresh_due(iteration)` for a Python int.
        read: `read(optimizer_values)`, the iteration count as an int.
    """

    def __init__(self, refresh_due, read):
        self._refresh_due, self._read = refresh_due, read
        self._predicted = None
        self._last = None
        self._check = True

    def due(self, optimizer_values):
        """Whether the step about to run on `optimizer_values` refreshes."""
        if (self._check or optimizer_values is not self._last
                or self._refresh_due(self._predicted)):
            self._predicted = self._read(optimizer_values)
        due = bool(self._refresh_due(self._predicted))
        self._check = due
        return due

    def stepped(self, optimizer_values):
        """Records the optimizer values a step returned."""
        self._predicted += 1
        self._last = optimizer_values
