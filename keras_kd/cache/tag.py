"""The tag a cached batch carries, and the teachers' weights fingerprints
it names."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import NamedTuple

import keras
import numpy as np

_TAG = re.compile(r"^t([0-9a-f]{16})_c(\d+)_k(\d+)_(mean|each)"
                  r"(?:_tokens_tau([0-9.e+-]+?)(?:_i(\d+))?)?$")

# Teacher names per fingerprint, for error messages.
KNOWN_TEACHERS: dict[str, list[str]] = {}


class CacheTag(NamedTuple):
    """What a cached batch says about the cache it comes from.

    Attributes:
        fingerprint: 16 hex digits, the teachers' weights fingerprint
            (`teachers_fingerprint`).
        num_classes: size of the teachers' last output axis.
        top_k: the number of stored logits per sample, or 0 (full outputs).
        mode: `"mean"` (one array: the teachers' averaged outputs) or
            `"each"` (one per teacher).
        temperature: for a per-token top-k cache (outputs of shape
            `(batch, time, vocab)`), the temperature of its stored
            log-probabilities, which the divergences reading it must use;
            `None` for every other cache.
        max_index: for a per-token top-k cache, its largest stored token
            id (checked against the student's vocabulary), or `None`.
    """

    fingerprint: str
    num_classes: int
    top_k: int
    mode: str
    temperature: object = None
    max_index: object = None

    @property
    def per_token(self):
        """Whether the cache holds per-token top-k distributions
        (`keras_kd.losses.TopKDistribution`)."""
        return self.temperature is not None

    def __str__(self):
        text = (f"t{self.fingerprint}_c{self.num_classes}_k{self.top_k}_"
                f"{self.mode}")
        if self.per_token:
            text += f"_tokens_tau{float(self.temperature)!r}"
            if self.max_index is not None:
                text += f"_i{int(self.max_index)}"
        return text

    @classmethod
    def parse(cls, text):
        match = _TAG.match(str(text))
        if match is None:
            raise ValueError(
                f"'{text}' is not the tag of a keras_kd teacher cache; build "
                "the data with `TeacherCache.inputs` or "
                "`TeacherCache.dataset`."
            )
        fingerprint, classes, k, mode, temperature, index = match.groups()
        return cls(fingerprint, int(classes), int(k), mode,
                   None if temperature is None else float(temperature),
                   None if index is None else int(index))


# Fingerprints.

def weights_fingerprint(model: keras.Model) -> str:
    """The SHA-256 digest of a model's weights (their order, dtypes, shapes
    and bytes, batch-norm statistics included), as 32 hex digits."""
    digest = hashlib.sha256()
    for variable in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(variable))
        digest.update(f"{value.dtype.str}{value.shape};".encode())
        # NumPy arrays are buffers; its stubs say so from Python 3.12.
        digest.update(memoryview(value).cast("B"))  # type: ignore[arg-type]
    return digest.hexdigest()[:32]


def teachers_fingerprint(
        teachers: Sequence[keras.Model]) -> tuple[str, list[str]]:
    """The 16-hex-digit fingerprint of an ordered list of teachers, and the
    per-teacher `weights_fingerprint`s it combines."""
    each = [weights_fingerprint(t) for t in teachers]
    combined = hashlib.sha256("|".join(each).encode()).hexdigest()[:16]
    return combined, each


def describe_teachers(fingerprint):
    names = KNOWN_TEACHERS.get(fingerprint)
    if names:
        return f"teachers {names} (fingerprint {fingerprint})"
    return f"teachers with weights fingerprint {fingerprint}"

