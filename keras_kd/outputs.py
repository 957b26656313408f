"""Which output of a model a term on the final outputs reads.

A model may return one tensor, a list or a dict of them. A term compares one
teacher output with one student output, so with several outputs it names
the one it reads (`Term(..., teacher_output=, student_output=)`): by name
(the key of a dict output, or the output name of a Functional model's list
output, `model.output_names`) or by index (the position in the list, or in
the dict's order).

The choice is checked when the `Distiller` is built where the model's
outputs are known (Functional and Sequential models) and at the first batch
otherwise (subclassed models), with the same messages.
"""

import keras

from keras_kd import _keras_compat as compat


def symbolic_outputs(model):
    """The symbolic outputs of a Functional or Sequential model (a tensor,
    a list or a dict), or `None` when they are not known before the model
    runs (subclassed or unbuilt models)."""
    try:
        return model.output
    except (AttributeError, ValueError):
        return None


def output_names(model, outputs):
    """The names of `outputs`, one per output, or `None` when they have
    none (a list returned by a subclassed model)."""
    if isinstance(outputs, dict):
        return list(outputs)
    count = len(outputs) if isinstance(outputs, (list, tuple)) else 1
    names = list(getattr(model, "output_names", None) or [])
    return names if len(names) == count else None


def describe(outputs, names):
    """`'cls' (None, 5), 'box' (None, 4)`: each output with its shape."""
    values = outputs_as_list(outputs)
    labels = names or [str(i) for i in range(len(values))]
    label = "{!r}" if names else "{}"
    return ", ".join(
        f"{label.format(n)} {tuple(v.shape)}" for n, v in zip(labels, values))


def outputs_as_list(outputs):
    """The outputs in order: the values of a dict, the items of a list, or
    the single tensor."""
    if isinstance(outputs, dict):
        return list(outputs.values())
    if isinstance(outputs, (list, tuple)):
        return list(outputs)
    return [outputs]


def is_tensor_like(value):
    """Whether `value` is one tensor (or array) rather than a list or a
    dict of them."""
    return not isinstance(value, (list, tuple, dict))


class OutputChoice:
    """The output of one model that one term reads.

    Args:
        model: the teacher or the student.
        which: `None` (the model's only output), an output name or an index.
        role: `"teacher"`, `"teacher 1"`, `"student"`, for messages.
        argument: `"teacher_output"` or `"student_output"`.
        term_name: the term's log name, for messages.

    Raises:
        ValueError: (where the model's outputs are known) `which` names no
            output, or is `None` for a model with several outputs.
    """

    def __init__(self, model, which, role, argument, term_name):
        self.which = which
        self.model_name = model.name
        self.role = role
        self.argument = argument
        self.term_name = term_name
        outputs = symbolic_outputs(model)
        self.names = None if outputs is None else output_names(model, outputs)
        self.shape = None
        if outputs is not None:
            self.shape = tuple(self(outputs).shape)
            if isinstance(outputs, dict) and isinstance(which, int):
                # A dict is read by key: its order may change (an
                # ensemble's average of dicts is ordered by key).
                self.which = self.names[which]

    def __call__(self, outputs):
        """The chosen output among `outputs` (the model's outputs, symbolic
        or computed)."""
        values = outputs_as_list(outputs)
        # A dict names its outputs itself; a list has the names found when
        # the Distiller was built (none for a subclassed model).
        names = list(outputs) if isinstance(outputs, dict) else self.names
        if names is not None and len(names) != len(values):
            names = None
        if self.which is None:
            if len(values) == 1:
                return values[0]
            self._fail(
                f"has {len(values)} outputs ({describe(outputs, names)}); "
                f"the term '{self.term_name}' compares final outputs, so it "
                "must say which one it reads: give the term "
                f"`{self.argument}=` an output name or index")
        if isinstance(self.which, str):
            if names is not None and self.which in names:
                return values[names.index(self.which)]
        elif isinstance(self.which, int) and not isinstance(self.which, bool):
            if -len(values) <= self.which < len(values):
                return values[self.which]
        self._fail(
            f"has no output {self.which!r} (`{self.argument}` of the term "
            f"'{self.term_name}'); its outputs are: "
            f"{describe(outputs, names)}")

    def _fail(self, what):
        raise ValueError(f"The {self.role} '{self.model_name}' {what}.")


def check_choice(which, argument):
    """Raises a `TypeError` unless `which` is `None`, a string or an
    integer."""
    if which is None or isinstance(which, str) or (
            isinstance(which, int) and not isinstance(which, bool)):
        return which
    raise TypeError(
        f"`{argument}` must be an output name (a string), an index (an "
        f"integer) or None; got {which!r}."
    )


def same_shape(a, b):
    """Whether two shapes can be equal: the same rank, and equal sizes
    wherever both are known, the batch axis aside."""
    if a is None or b is None:
        return True
    return len(a) == len(b) and all(
        x is None or y is None or x == y for x, y in zip(a[1:], b[1:]))


def check_same_shape(a, b, message):
    """Raises `ValueError(message)` unless `same_shape(a, b)`."""
    if not same_shape(a, b):
        raise ValueError(message)


_PROBABILITY_ACTIVATIONS = ("softmax", "sigmoid")


def _activation_name(layer):
    """`"softmax"` or `"sigmoid"` when `layer` ends in that activation (a
    `Softmax` layer, an `Activation` layer or a layer's `activation=`),
    else `None`."""
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    activation = getattr(layer, "activation", None)
    if activation is None:
        return None
    try:
        name = keras.activations.serialize(activation)
    except (TypeError, ValueError):
        return None
    if isinstance(name, dict):
        name = name.get("config", name.get("class_name"))
    return name if name in _PROBABILITY_ACTIVATIONS else None


def probability_layer(output):
    """The layer that makes a symbolic model output a probability (a
    softmax or sigmoid at its end), as `(layer name, activation)`, or
    `None` when the output is not one (or is not known before the model
    runs).

    Args:
        output: a symbolic output tensor of a Functional or Sequential
            model (`None` for a subclassed model).
    """
    layer = compat.producer_layer(output)
    if layer is None:
        return None
    activation = _activation_name(layer)
    return None if activation is None else (layer.name, activation)


def check_reads_logits(what, from_logits, outputs):
    """Refuses to read probabilities as logits: when `from_logits` is True
    and one of `outputs` ends in a softmax or sigmoid.

    Args:
        what: the reader, for the message (e.g. `"the term 'kd' (KD)"`).
        from_logits: the reader's `from_logits`.
        outputs: `[(role, model name, symbolic output or None)]`, the
            outputs it reads.

    Raises:
        ValueError: naming the model, its layer and activation, and both
            fixes.
    """
    if not from_logits:
        return
    for role, model_name, output in outputs:
        found = probability_layer(output)
        if found is None:
            continue
        layer, activation = found
        raise ValueError(
            f"The {role} '{model_name}' outputs probabilities (its layer "
            f"'{layer}' ends in a {activation}), but {what} reads logits "
            "(`from_logits=True`, the default): on probabilities it would "
            "train on an almost flat signal. Either give the model logits "
            f"(build '{layer}' with `activation=None`, or drop the final "
            f"`Softmax` layer), or pass `from_logits=False` to {what}."
        )
