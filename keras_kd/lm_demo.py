"""A small, self-contained language-model distillation demo with Keras Hub.

A teacher GPT-2 `CausalLM` (Keras Hub, built from scratch: nothing is
downloaded) learns a synthetic grammar from plenty of sentences. A smaller
GPT-2 student gets only a few sentences, and is trained on them for the
same number of steps either alone (next-token cross-entropy) or distilled
from the teacher (cross-entropy plus a token-level divergence). Held-out
perplexity tells them apart.

The tokenizer is Keras Hub's `GPT2Tokenizer` (byte-level BPE) over a
vocabulary and merges written in code, and batches come from Keras Hub's
`GPT2CausalLMPreprocessor`: its padding mask goes to the model, and its
`sample_weight` (0 on padding) to every loss. Keras Hub is the optional
`[lm]` extra, imported only by the functions that need it.

Every piece is a public function so that the tests, the notebook
(`examples/language_models.ipynb`) and the docs share it.
"""

import math

import keras
import numpy as np

import keras_kd

DETERMINERS = ("the", "a")
ADJECTIVES = ("big", "small", "red", "old", "young", "happy")
NOUNS = ("cat", "dog", "bird", "fox", "cow", "hen", "owl", "pig", "rat",
         "bee")
VERBS = ("sees", "likes", "chases", "finds", "hears", "follows")
PREPOSITIONS = ("near", "under", "behind")
WORDS = DETERMINERS + ADJECTIVES + NOUNS + VERBS + PREPOSITIONS

# The comparison at the size the tests use (`run(**SMALL)`): a few seconds
# of training per model on a CPU. The batch sizes of `run` (32 for the
# teacher, 16 for the student) divide the sentence counts, so that each
# model's training step compiles for one shape.
SMALL = dict(teacher_sentences=512, student_sentences=32, test_sentences=128,
             teacher_epochs=3, student_epochs=30)


def _keras_hub():
    try:
        import keras_hub
    except ImportError as error:  # pragma: no cover - depends on the env
        raise ImportError(
            "The language-model demo needs Keras Hub: "
            "pip install 'keras-kd[lm]'") from error
    return keras_hub


def _noun_phrase(rng):
    words = [DETERMINERS[rng.integers(len(DETERMINERS))]]
    if rng.random() < 0.5:
        words.append(ADJECTIVES[rng.integers(len(ADJECTIVES))])
    words.append(NOUNS[rng.integers(len(NOUNS))])
    return words


def grammar_sentences(count, seed=0):
    """`count` sentences of a small grammar:
    `NP VERB NP [PREPOSITION NP] .`, with `NP = DET [ADJ] NOUN`, every
    choice uniform. Many continuations are valid at each position, which
    is what a teacher's soft targets convey and a few sentences do not."""
    rng = np.random.default_rng(seed)
    sentences = []
    for _ in range(count):
        words = _noun_phrase(rng) + [VERBS[rng.integers(len(VERBS))]]
        words += _noun_phrase(rng)
        if rng.random() < 0.5:
            words.append(PREPOSITIONS[rng.integers(len(PREPOSITIONS))])
            words += _noun_phrase(rng)
        sentences.append(" ".join(words) + " .")
    return sentences


def build_tokenizer(words=WORDS):
    """A Keras Hub `GPT2Tokenizer` whose byte-level BPE vocabulary holds
    each word of `words` as one token (`"Ġword"`), written in code."""
    keras_hub = _keras_hub()
    vocabulary = {"<|endoftext|>": 0}
    merges = []

    def add(token):
        vocabulary.setdefault(token, len(vocabulary))

    for char in sorted(set("".join(words)) | {"Ġ", "."}):
        add(char)
    add("Ġ.")
    merges.append("Ġ .")
    for word in words:
        pieces = list("Ġ" + word)
        current = pieces[0]
        for piece in pieces[1:]:
            merge = f"{current} {piece}"
            if merge not in merges:
                merges.append(merge)
            current += piece
            add(current)
    return keras_hub.models.GPT2Tokenizer(
        vocabulary=vocabulary, merges=merges, add_prefix_space=True)


def build_preprocessor(tokenizer, sequence_length=16):
    """Keras Hub's `GPT2CausalLMPreprocessor` over `tokenizer`."""
    keras_hub = _keras_hub()
    return keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer, sequence_length=sequence_length)


def build_causal_lm(vocabulary_size, num_layers=2, hidden_dim=32,
                    num_heads=2, sequence_length=16, seed=0, name=None):
    """A GPT-2 `CausalLM` from scratch (no preprocessor: batches are
    preprocessed once, see `preprocess`)."""
    keras_hub = _keras_hub()
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=vocabulary_size, num_layers=num_layers,
        num_heads=num_heads, hidden_dim=hidden_dim,
        intermediate_dim=2 * hidden_dim, dropout=0.0,
        max_sequence_length=sequence_length)
    return keras_hub.models.GPT2CausalLM(backbone=backbone,
                                         preprocessor=None, name=name)


def preprocess(preprocessor, sentences):
    """`(x, y, sample_weight)` as NumPy arrays: `x` is Keras Hub's
    `{"token_ids", "padding_mask"}`, `y` the next tokens and
    `sample_weight` 0 where `y` is padding."""
    x, y, sample_weight = preprocessor(sentences)
    x = {key: np.asarray(keras.ops.convert_to_numpy(value))
         for key, value in x.items()}
    return (x, np.asarray(keras.ops.convert_to_numpy(y)),
            np.asarray(keras.ops.convert_to_numpy(sample_weight),
                       "float32"))


def token_cross_entropy():
    """Next-token cross-entropy, averaged over the unpadded tokens."""
    return keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="mean_with_sample_weight")


def perplexity(model, data):
    """`exp` of the mean next-token cross-entropy over the unpadded tokens
    of `data` (from `preprocess`)."""
    x, y, weights = data
    logits = keras.ops.convert_to_numpy(model(x, training=False))
    logits = logits.astype("float64")
    logits -= logits.max(-1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_p, y[..., None], axis=-1)[..., 0]
    return float(math.exp(-(picked * weights).sum() / weights.sum()))


def train_alone(model, data, epochs, batch_size=16, learning_rate=3e-3):
    """Supervised next-token training of `model` on `data` (in order, as
    `distill` does: Keras Hub's `fit` does not shuffle arrays)."""
    x, y, weights = data
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=token_cross_entropy(), weighted_metrics=[])
    model.fit(x, y, sample_weight=weights, batch_size=batch_size,
              epochs=epochs, shuffle=False, verbose=0)
    return model


def distill(teacher, student, data, epochs, loss=None, batch_size=16,
            learning_rate=3e-3, student_loss_weight=0.5):
    """Distils `teacher` into `student` on `data`: the student's
    cross-entropy on the labels (weighted `student_loss_weight`) plus a
    token-level divergence (`ForwardKL` by default), both averaged over the
    unpadded tokens. Returns the `Distiller`."""
    loss = loss or keras_kd.losses.ForwardKL(chunk_size=8)
    distiller = keras_kd.Distiller(
        teacher, student, terms=[keras_kd.Term(loss)],
        student_loss_weight=student_loss_weight)
    distiller.compile(optimizer=keras.optimizers.Adam(learning_rate),
                      loss=token_cross_entropy())
    x, y, weights = data
    distiller.fit(x, y, sample_weight=weights, batch_size=batch_size,
                  epochs=epochs, shuffle=False, verbose=0)
    return distiller


def subset(data, count):
    """The first `count` sequences of `data` (from `preprocess`)."""
    return tuple({k: v[:count] for k, v in part.items()}
                 if isinstance(part, dict) else part[:count]
                 for part in data)


def run(teacher_sentences=2000, student_sentences=48, test_sentences=256,
        teacher_epochs=3, student_epochs=40, seed=0, loss=None,
        learning_rate=1e-2):
    """The whole comparison; returns a dict of held-out perplexities
    (`teacher`, `student_alone`, `student_distilled`) and the models.

    The two students are one model trained twice from the same initial
    weights: alone, then (weights reset) distilled, on the same
    `student_sentences` sentences, in the same order, for the same epochs.
    """
    tokenizer = build_tokenizer()
    preprocessor = build_preprocessor(tokenizer)
    vocabulary = tokenizer.vocabulary_size()
    train = preprocess(preprocessor, grammar_sentences(teacher_sentences,
                                                       seed=seed))
    few = subset(train, student_sentences)
    test = preprocess(preprocessor, grammar_sentences(test_sentences,
                                                      seed=seed + 1))
    teacher = build_causal_lm(vocabulary, num_layers=2, hidden_dim=32,
                              seed=seed, name="teacher")
    train_alone(teacher, train, epochs=teacher_epochs, batch_size=32,
                learning_rate=learning_rate)
    student = build_causal_lm(vocabulary, num_layers=1, hidden_dim=16,
                              seed=seed + 1, name="student")
    initial = student.get_weights()
    train_alone(student, few, epochs=student_epochs,
                learning_rate=learning_rate)
    alone = perplexity(student, test)
    student.set_weights(initial)
    distill(teacher, student, few, epochs=student_epochs, loss=loss,
            learning_rate=learning_rate)
    return {
        "teacher": perplexity(teacher, test),
        "student_alone": alone,
        "student_distilled": perplexity(student, test),
        "models": (teacher, student),
        "data": (train, few, test),
    }
