"""The per-position computation of the token divergences: softmax of both
sides at a temperature, LM heads applied on the fly, vocabulary truncation,
sparse (top-k) teachers, and chunking along the time axis with each chunk
rematerialized in the backward pass.

`divergence_loss(teacher, student, divergence, ...)` returns the
per-position values of one divergence formula (`keras_kd.ops.divergences`);
the loss classes of `keras_kd.losses.divergences` weight and reduce them.
Everything is `keras.ops` (plus `jax.lax.scan` for the JAX chunk loop).
"""

import inspect

import keras
from keras import ops

from keras_kd.ops.probabilities import LOG_FLOOR, as_logits
from keras_kd.teachers.topk import TopKDistribution, topk_bins

VOCAB_MAPPINGS = (None, "truncate")


def lm_head_function(head):
    """`(fn, vocab_size)` for an LM head: `fn(hidden) -> logits`.

    A Keras Hub `ReversibleEmbedding` (tied embeddings) is called with
    `reverse=True`; a plain `keras.layers.Embedding` projects onto its
    transposed table; any other layer or callable is called as is. The
    vocabulary size is read from the layer when it has one (`units`,
    `input_dim`), else from a `vocab_size` attribute, else unknown.
    """
    if head is None:
        return None, None
    if not callable(head):
        raise TypeError(
            "An LM head must be a Keras layer or a callable mapping hidden "
            f"states to logits, got {head!r}."
        )
    vocab = getattr(head, "vocab_size", None)
    if isinstance(head, keras.layers.Embedding) or hasattr(head,
                                                          "embeddings"):
        vocab = getattr(head, "input_dim", vocab)
        params = inspect.signature(head.call).parameters
        if "reverse" in params:
            return (lambda h: head(h, reverse=True)), vocab

        def project(hidden):
            table = ops.convert_to_tensor(head.embeddings)
            return ops.matmul(hidden, ops.transpose(
                ops.cast(table, hidden.dtype)))

        return project, vocab
    if hasattr(head, "units"):
        vocab = head.units
    return head, vocab


# --------------------------------------------------------------------------
# The chunked computation.
# --------------------------------------------------------------------------


def _split(x, pieces, axis):
    """`x` in `pieces` consecutive parts along `axis` (sizes differ by at
    most one), with static shapes on every backend."""
    if hasattr(ops, "array_split"):
        return list(ops.array_split(x, pieces, axis=axis))
    length = x.shape[axis]
    base, extra = divmod(length, pieces)
    bounds, edge = [], 0
    for index in range(pieces - 1):
        edge += base + (1 if index < extra else 0)
        bounds.append(edge)
    return list(ops.split(x, bounds, axis=axis))


def _flatten_teacher(teacher):
    if isinstance(teacher, TopKDistribution):
        return list(teacher), True
    return [teacher], False


def divergence_loss(teacher_output, student_output, divergence,
                    temperature=1.0, chunk_size=None, vocab_mapping=None,
                    lm_head=None, teacher_lm_head=None, from_logits=True):
    """Per-position divergence between teacher and student outputs.

    Args:
        teacher_output: `(..., vocab)` teacher logits; or, with
            `teacher_lm_head`, `(..., hidden)` teacher hidden states; or a
            `TopKDistribution`.
        student_output: `(..., vocab)` student logits; or, with `lm_head`,
            `(..., hidden)` student hidden states.
        divergence: a function `(log_p_t, log_p_s) -> (...)` such as
            `forward_kl`.
        temperature: `tau`; the result is multiplied by `tau ** 2`.
        chunk_size: `None`, or the number of positions along axis `-2`
            (the time axis of `(batch, time, vocab)` logits, the batch axis
            of `(batch, classes)`) computed at once. Each chunk is
            rematerialized (`keras.remat`) in the backward pass.
        vocab_mapping: `None` (vocabularies must be equal) or `"truncate"`
            (both sides are cut to the smaller vocabulary's first entries).
        lm_head: `None`, or the student's LM head (a layer or a callable
            `hidden -> logits`), applied chunk by chunk.
        teacher_lm_head: `None`, or the teacher's LM head, likewise.
        from_logits: `False` when the outputs (after the LM heads) are
            probabilities, read as logits by
            `keras_kd.ops.probabilities.as_logits`, chunk by chunk. A
            `TopKDistribution` teacher is log-probabilities already and is
            read as it is.

    Returns:
        A float32 tensor of shape `student_output.shape[:-1]`.
    """
    if vocab_mapping not in VOCAB_MAPPINGS:
        raise ValueError(f"`vocab_mapping` must be one of {VOCAB_MAPPINGS}, "
                         f"got {vocab_mapping!r}.")
    student_head, _ = lm_head_function(lm_head)
    teacher_head, _ = lm_head_function(teacher_lm_head)
    parts, sparse = _flatten_teacher(teacher_output)
    parts = [ops.stop_gradient(ops.convert_to_tensor(p)) for p in parts]
    if sparse and teacher_head is not None:
        raise ValueError("A `TopKDistribution` teacher has no LM head to "
                         "apply; leave `teacher_lm_head` unset.")
    temperature = float(temperature)

    def per_position(student, *teacher):
        if student_head is not None:
            student = student_head(student)
        student = as_logits(ops.cast(student, "float32"), from_logits)
        if sparse:
            log_p_t, log_p_s = topk_bins(TopKDistribution(*teacher),
                                          student, temperature)
        else:
            log_p_s = ops.log_softmax(student / temperature, axis=-1)
            logits = teacher[0]
            if teacher_head is not None:
                logits = ops.stop_gradient(teacher_head(logits))
            logits = as_logits(ops.cast(logits, "float32"), from_logits)
            v_t, v_s = logits.shape[-1], log_p_s.shape[-1]
            if v_t != v_s:
                if vocab_mapping != "truncate" or None in (v_t, v_s):
                    raise vocab_error(v_t, v_s)
                size = min(v_t, v_s)
                logits = logits[..., :size]
                # Renormalized over the kept entries.
                log_p_s = ops.log_softmax(student[..., :size] / temperature,
                                          axis=-1)
            log_p_t = ops.maximum(
                ops.log_softmax(logits / temperature, axis=-1), LOG_FLOOR)
        return (temperature ** 2) * divergence(log_p_t, log_p_s)

    student_output = ops.convert_to_tensor(student_output)
    rank = len(student_output.shape)
    if rank < 2:
        raise ValueError(
            "Divergences take `(batch, vocab)` or `(batch, time, vocab)` "
            f"outputs; got shape {tuple(student_output.shape)}.")
    axis = rank - 2
    length = student_output.shape[axis]
    if chunk_size is None or (length is not None and length <= chunk_size):
        return per_position(student_output, *parts)
    if length is None:
        raise ValueError(
            f"`chunk_size={chunk_size}` needs the length of axis {axis} of "
            f"the outputs to be known when the loss is traced; got shape "
            f"{tuple(student_output.shape)}. Give the data a fixed sequence "
            "length (and, for (batch, classes) outputs, "
            "`drop_remainder=True`).")
    # TensorFlow's `tf.recompute_grad` differentiates the chunk's inputs and
    # the variables it reads, not tensors a callable closes over: a student
    # head that is not a Keras layer would silently get no gradient, so its
    # chunks are not rematerialized there.
    remat = not (keras.backend.backend() == "tensorflow"
                 and lm_head is not None
                 and not isinstance(lm_head, keras.layers.Layer))
    return _chunked_map(per_position, student_output, parts, chunk_size,
                        axis, remat=remat)


def _chunked_map(fn, student, parts, chunk_size, axis, remat=True):
    """`fn(student, *parts)` computed over consecutive chunks of
    `chunk_size` positions along `axis`, each rematerialized in the backward
    pass; the per-position results are concatenated along `axis`.

    On JAX the full chunks run in one `lax.scan` over chunk indices whose
    body slices the inputs itself and is checkpointed: the scan makes XLA
    run the chunks one after another (a Python loop over slices lets XLA
    keep every slice, and several chunks' intermediates, alive), and the
    gradients of the full inputs accumulate across iterations. Elsewhere the
    inputs are split into views (PyTorch) or tensors (TensorFlow) and each
    chunk goes through `keras.remat`; eager PyTorch frees each chunk's
    intermediates before the next.
    """
    length = student.shape[axis]
    if keras.backend.backend() == "jax":
        return _jax_chunked_map(fn, student, parts, chunk_size, axis)
    pieces = -(-length // chunk_size)
    student_chunks = _split(student, pieces, axis)
    teacher_chunks = [_split(p, pieces, axis) for p in parts]
    step = keras.remat(fn) if remat else fn
    values = [step(s, *t) for s, *t in zip(student_chunks, *teacher_chunks)]
    return ops.concatenate(values, axis=axis)


def _jax_chunked_map(fn, student, parts, chunk_size, axis):
    import jax

    length = student.shape[axis]
    full, rest = divmod(length, chunk_size)

    def chunk(x, start, size):
        return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)

    @jax.checkpoint
    def body(carry, index):
        start = index * chunk_size
        value = fn(chunk(student, start, chunk_size),
                   *[chunk(p, start, chunk_size) for p in parts])
        return carry, value

    _, stacked = jax.lax.scan(body, 0, ops.arange(full, dtype="int32"))
    # (chunks, *leading, chunk_size) -> (*leading, chunks * chunk_size).
    values = ops.moveaxis(stacked, 0, axis)
    shape = tuple(values.shape)
    values = ops.reshape(
        values, shape[:axis] + (full * chunk_size,) + shape[axis + 2:])
    if rest:
        start = full * chunk_size
        tail = jax.checkpoint(fn)(chunk(student, start, rest),
                                  *[chunk(p, start, rest) for p in parts])
        values = ops.concatenate([values, tail], axis=axis)
    return values


def vocab_error(teacher_vocab, student_vocab, teacher="teacher",
                student="student"):
    """The error for teacher and student vocabularies of different sizes."""
    return ValueError(
        f"The {teacher} has a vocabulary of {teacher_vocab} entries (last "
        f"axis of its logits) but the {student} has {student_vocab}. If both "
        "use one tokenizer and one embedding table is only padded (e.g. "
        "151936 vs 152064), give the divergence `vocab_mapping='truncate'` "
        "to compare the first min(V_teacher, V_student) entries. Different "
        "tokenizers are not supported (cross-tokenizer distillation is out "
        "of scope).")
