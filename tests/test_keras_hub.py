"""Distilling a Keras Hub `CausalLM` into a smaller one (GPT-2 architecture,
built from scratch: nothing is downloaded), through Keras Hub's own
tokenizer, preprocessor and padding masks. Skipped without Keras Hub (the
`[lm]` extra)."""

import numpy as np
import pytest

from backend_utils import to_numpy

keras_hub = pytest.importorskip("keras_hub")

import keras  # noqa: E402

from keras_kd import Distiller, Term, lm_demo  # noqa: E402
from keras_kd.losses import ForwardKL  # noqa: E402


@pytest.fixture(scope="module")
def comparison():
    # Teacher: 2 layers of width 32, 2 epochs on 512 sentences of a
    # synthetic grammar; student: 1 layer of width 16, 32 sentences, 30
    # epochs alone, then again from the same weights distilled. Every model
    # is trained by one compiled step (the batches divide the data).
    return lm_demo.run(**lm_demo.SMALL, seed=0)


def test_distilled_student_beats_the_student_alone(comparison):
    teacher = comparison["teacher"]
    alone = comparison["student_alone"]
    distilled = comparison["student_distilled"]
    print(f"held-out perplexity: teacher {teacher:.3f}, student alone "
          f"{alone:.3f}, distilled {distilled:.3f}")
    assert teacher < alone
    assert distilled < 0.9 * alone


def test_padding_masks_and_the_fused_head(comparison):
    teacher, student = comparison["models"]
    # The held-out batch that the perplexities were computed on (eager
    # calls at a shape already seen are cheap on JAX).
    x, y, weights = comparison["data"][2]
    vocabulary = student.backbone.vocabulary_size
    assert weights.min() == 0.0 and weights.max() == 1.0  # uneven padding
    t, s = to_numpy(teacher(x)), to_numpy(student(x))
    loss = ForwardKL(chunk_size=5)
    per_token = np.asarray(to_numpy(ForwardKL(reduction="none")(t, s)),
                           "float64")
    expected = (per_token * weights).sum() / weights.sum()
    np.testing.assert_allclose(
        float(to_numpy(loss(t, s, sample_weight=weights))), expected,
        rtol=2e-4)
    # Other tokens in the padding change neither the real positions'
    # logits (the padding mask) nor the loss (its sample weight), though
    # they change the padded positions' divergences.
    noisy = dict(x)
    rng = np.random.default_rng(0)
    noisy["token_ids"] = np.where(
        x["padding_mask"], x["token_ids"],
        rng.integers(1, vocabulary, size=x["token_ids"].shape)).astype(
            x["token_ids"].dtype)
    t2, s2 = to_numpy(teacher(noisy)), to_numpy(student(noisy))
    padded = to_numpy(ForwardKL(reduction="none")(t2, s2))
    assert np.abs(padded - per_token)[weights == 0].max() > 1e-3
    np.testing.assert_allclose(
        float(to_numpy(loss(t2, s2, sample_weight=weights))), expected,
        rtol=2e-4)
    # The fused form reads the backbone's hidden states and its tied
    # token embedding (a `ReversibleEmbedding`), chunk by chunk.
    backbone = student.backbone
    fused = ForwardKL(chunk_size=5, lm_head=backbone.token_embedding)
    np.testing.assert_allclose(
        float(to_numpy(fused(t, backbone(x), sample_weight=weights))),
        expected, rtol=2e-4)
    # In a Distiller: the student is the backbone, trained without ever
    # building its full logits; the tied embedding (the head) is trained.
    distiller = Distiller(teacher, backbone, terms=[Term(fused)])
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    table = backbone.token_embedding.embeddings
    before = to_numpy(table.value).copy()
    history = distiller.fit(x, sample_weight=weights, batch_size=64,
                            epochs=3, verbose=0)
    assert not np.allclose(to_numpy(table.value), before)
    values = history.history["forward_kl_loss"]
    assert values[-1] < values[0]


def test_vocabulary_mismatch_names_both_sizes(comparison):
    teacher, _ = comparison["models"]
    vocabulary = teacher.backbone.vocabulary_size
    student = lm_demo.build_causal_lm(vocabulary + 64, num_layers=1,
                                      hidden_dim=16)
    with pytest.raises(ValueError, match=f"{vocabulary} entries.*"
                                         f"has {vocabulary + 64}"):
        Distiller(teacher, student, terms=[Term(ForwardKL())])
    Distiller(teacher, student, terms=[
        Term(ForwardKL(vocab_mapping="truncate"))])
