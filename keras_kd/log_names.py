"""The names under which a distiller logs its losses.

A distiller logs `loss`, `student_loss`, one `<name>_loss` per term, one
per local module (`<name>_<k>_loss`) and, for a multi-output student, the
compiled loss of each output (`<output>_loss`), each also as `val_<key>`.
The user's `Term`s are never renamed: two terms of one name log under the
first free `<name>_<k>`, and a term whose log would take a key of the
distiller, of the compiled loss or of a validation log is refused.
"""

from typing import NamedTuple

from keras_kd.outputs import output_names, outputs_as_list
from keras_kd.outputs import symbolic_outputs


class LogNames(NamedTuple):
    """The loss logs of one distiller.

    Attributes:
        terms: one log name per term, in order.
        extensions: the names of the extension losses (local modules).
        outputs: the names of a multi-output student's per-output
            compiled losses (empty for one output).
    """

    terms: list
    extensions: list
    outputs: list

    @classmethod
    def of(cls, terms, student, extensions=()):
        """Checks the terms' names against the distiller's own logs and
        names each term.

        Args:
            terms: the user's `Term`s, in order.
            student: the student model.
            extensions: the names of the extension losses.

        Raises:
            ValueError: a term named like a log of the distiller, of the
                compiled loss, or of a validation value.
        """
        extensions = list(extensions)
        outputs = output_loss_names(student)
        check_term_names(terms, extensions, outputs)
        reserved = ["student"] + extensions + outputs
        names = unique_names(terms, reserved=reserved)
        check_validation_keys(terms, names, reserved)
        return cls(names, extensions, outputs)

    @property
    def loss_keys(self):
        """Every loss log key: `loss`, `student_loss` and each
        `<name>_loss`."""
        return ["loss", "student_loss"] + [
            f"{n}_loss" for n in self.terms + self.extensions + self.outputs]


def unique_names(terms, reserved=()):
    """A log name per term: the term's own name, or, when an earlier term
    (or a reserved name) took it, that name with the first free suffix
    `_1`, `_2`, ... that no term and no reserved name uses.

    Args:
        terms: the `Term`s, in order.
        reserved: names no term may be given automatically.

    Returns:
        A list of names, one per term, all distinct.

    Example:

    >>> unique_names([Term(KD()), Term(KD()), Term(KD(), name="kd_1")])
    ['kd', 'kd_2', 'kd_1']
    """
    wanted = [term.name for term in terms]
    taken = set(reserved)
    names = []
    for index, name in enumerate(wanted):
        later = set(wanted[index + 1:])
        if name in taken:
            suffix = 1
            while (f"{name}_{suffix}" in taken
                   or f"{name}_{suffix}" in later
                   or f"{name}_{suffix}" in wanted[:index]):
                suffix += 1
            name = f"{name}_{suffix}"
        taken.add(name)
        names.append(name)
    return names


def output_loss_names(student):
    """The names `<name>_loss` under which Keras logs the compiled loss
    of each output of a multi-output student (empty for one output, or
    when the outputs are only known at run time)."""
    outputs = symbolic_outputs(student)
    if outputs is None or len(outputs_as_list(outputs)) < 2:
        return []
    return list(output_names(student, outputs) or [])


def check_term_names(terms, extension_losses, output_losses=()):
    """Refuses a term name whose log key the distiller or the compiled
    student loss uses itself."""
    own = {"student": "the student's own loss"}
    own.update((name, "a local module's activation-mapping loss")
               for name in extension_losses)
    own.update((name, f"the compiled student loss on its output '{name}'")
               for name in output_losses)
    for term in terms:
        if term.name in own:
            raise ValueError(
                f"The term {term!r} is named '{term.name}', so it would log "
                f"as '{term.name}_loss', the key of {own[term.name]}. Give "
                "the term another `name=`."
            )


def check_validation_keys(terms, names, other_losses):
    """Refuses a term whose log `<name>_loss` is the validation form
    (`val_<key>`) of another training log, such as a term named `val`
    (`val_loss`, the validation total)."""
    keys = {"loss"} | {f"{n}_loss" for n in list(names) + list(other_losses)}
    for term, name in zip(terms, names):
        key = f"{name}_loss"
        if key.startswith("val_") and key[len("val_"):] in keys:
            raise ValueError(
                f"The term {term!r} would log as '{key}', the key of the "
                f"validation value of '{key[len('val_'):]}'. Give the term "
                "another `name=`."
            )
