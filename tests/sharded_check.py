"""Run by test_sharded.py in a process of its own: the virtual devices
(`--xla_force_host_platform_device_count=8`) must be configured before JAX
initialises.

    python sharded_check.py [PART ...]

PART is `train` (a Keras Hub Gemma teacher sharded with its own layout map,
distilled into a student, against the same run on one device), `memory`
(the compiled step's per-device argument memory as the model axis grows),
`cache` (a teacher cache built from a sharded teacher) or `extensions`
(local modules and layer-wise learning rates with a sharded teacher); all
four by default. Prints one line `RESULT <json>`.

The models are built from scratch with small configurations: nothing is
downloaded.
"""

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from conftest import make_cnn  # noqa: E402

import keras_kd  # noqa: E402
from keras_kd.losses import ForwardKL  # noqa: E402

keras.config.disable_traceback_filtering()
Gemma = keras_hub.models.GemmaBackbone
VOCAB, LENGTH, BATCH, STEPS = 256, 32, 8, 3
TEACHER = dict(num_layers=2, hidden_dim=64, intermediate_dim=128)
STUDENT = dict(num_layers=1, hidden_dim=32, intermediate_dim=64)


def gemma(config, seed, weights=None, vocabulary=VOCAB, heads=4):
    """A Gemma `CausalLM` built from scratch, with `weights` if given."""
    keras.utils.set_random_seed(seed)
    backbone = Gemma(vocabulary_size=vocabulary, num_query_heads=heads,
                     num_key_value_heads=heads,
                     head_dim=config["hidden_dim"] // heads, **config)
    model = keras_hub.models.GemmaCausalLM(backbone=backbone,
                                           preprocessor=None)
    if weights is not None:
        model.set_weights(weights)
    return model


def token_data(rows=BATCH, length=LENGTH, vocabulary=VOCAB):
    """Token ids with uneven padding, and their token weights."""
    rng = np.random.default_rng(0)
    mask = np.ones((rows, length), "int32")
    mask[::2, length * 5 // 8:] = 0
    mask[1::4, length * 3 // 8:] = 0
    x = {"token_ids": rng.integers(1, vocabulary, (rows, length))
         .astype("int32") * mask, "padding_mask": mask}
    return x, mask.astype("float32")


def mesh_of(batch, model):
    return keras.distribution.DeviceMesh(
        (batch, model), ("batch", "model"), jax.devices()[:batch * model])


def sharded(mesh, layout_map=None):
    """`ModelParallel` on `mesh`: variables follow `layout_map` (by
    default none: replicated), the batch is split on the batch axis."""
    return keras.distribution.ModelParallel(
        layout_map=layout_map or keras.distribution.LayoutMap(mesh),
        batch_dim_name="batch")


def numpy_weights(model):
    return [np.asarray(w) for w in model.get_weights()]


def distiller(teacher, student, fused):
    if fused:
        teacher, student = teacher.backbone, student.backbone
        loss = ForwardKL(chunk_size=8,
                         teacher_lm_head=teacher.token_embedding,
                         lm_head=student.token_embedding)
    else:
        loss = ForwardKL(chunk_size=8)
    d = keras_kd.Distiller(teacher, student, terms=[keras_kd.Term(loss)],
                           student_loss_weight=0.0)
    d.compile(optimizer=keras.optimizers.Adam(1e-2))
    return d


def distil(teacher, student, fused, distribution=None):
    """Three steps (one per epoch); the loss of each and the student's
    weights after them."""
    x, weights = token_data()
    keras.distribution.set_distribution(distribution)
    try:
        d = distiller(teacher, student, fused)
        history = d.fit(x, sample_weight=weights, batch_size=BATCH,
                        epochs=STEPS, verbose=0, shuffle=False)
    finally:
        keras.distribution.set_distribution(None)
    return history.history["loss"], numpy_weights(student)


def shard_shapes(model):
    """Per variable path: the shape of the shard on each device."""
    return {v.path: sorted({tuple(s.data.shape)
                            for s in v.value.addressable_shards})
            for v in model.weights}


def train():
    """On a (2, 4) mesh: a Gemma teacher under Keras Hub's layout map, a
    student replicated (logits, chunked) or under its own layout map (the
    fused form); the training distribution splits the batch."""
    teacher_weights = numpy_weights(gemma(TEACHER, 0))
    student_weights = numpy_weights(gemma(STUDENT, 1))
    mesh = mesh_of(2, 4)
    teacher_scope = sharded(mesh, Gemma.get_layout_map(mesh))
    training = sharded(mesh)
    out = {}
    for fused in (False, True):
        name = "fused" if fused else "logits"
        ref_loss, ref_weights = distil(gemma(TEACHER, 0, teacher_weights),
                                       gemma(STUDENT, 1, student_weights),
                                       fused)
        with teacher_scope.scope():
            teacher = gemma(TEACHER, 0, teacher_weights)
        # The student: replicated, or under a layout map of its own with
        # the same variable paths as the teacher's.
        student_scope = teacher_scope if fused else training
        with student_scope.scope():
            student = gemma(STUDENT, 1, student_weights)
        loss, weights = distil(teacher, student, fused, training)
        out[name] = {
            "reference_loss": ref_loss, "loss": loss,
            "max_weight_diff": max(float(np.abs(a - b).max())
                                   for a, b in zip(ref_weights, weights)),
            "teacher_unchanged": all(
                np.array_equal(a, b) for a, b in
                zip(teacher_weights, numpy_weights(teacher))),
            "teacher_shards": shard_shapes(teacher),
            "student_shards": shard_shapes(student),
            "devices": len(teacher.weights[0].value.sharding.device_set),
        }
    # A teacher built outside any distribution sits on one device: named
    # before anything is compiled.
    teacher = gemma(TEACHER, 0)
    with training.scope():
        student = gemma(STUDENT, 1)
        d = distiller(teacher, student, fused=False)
    x, weights = token_data()
    keras.distribution.set_distribution(training)
    try:
        d.fit(x, sample_weight=weights, batch_size=BATCH, verbose=0)
        out["off_mesh_error"] = ""
    except ValueError as error:
        out["off_mesh_error"] = str(error)
    finally:
        keras.distribution.set_distribution(None)
    return out


def lowered_step(d, x, weights):
    """The distiller's training step compiled for one batch, as `fit`
    compiles it (`jax.jit` of `train_step`, with the batch laid out by the
    current distribution)."""
    d.optimizer.build(d.trainable_variables)
    state = ([v.value for v in d.trainable_variables],
             [v.value for v in d.non_trainable_variables],
             [v.value for v in d.optimizer.variables],
             [v.value for v in d.metrics_variables])
    distribution = keras.distribution.distribution()
    # `fit(x, sample_weight=w)` without labels: the weights travel in `x`.
    data = (keras_kd.batches.carry_weights(x, weights),)
    data = jax.tree_util.tree_map(
        lambda a: jax.device_put(a, distribution.get_data_layout(a.shape)
                                 .backend_layout), data)
    return jax.jit(d.train_step).lower(state, data).compile()


MEMORY_TEACHER = dict(num_layers=2, hidden_dim=128, intermediate_dim=512)


def memory(model_axes=(1, 2, 4, 8)):
    """Per model-axis size M (mesh `(1, M)`): XLA's account of the compiled
    step's per-device argument bytes, and the bytes of the teacher's
    shards on one device."""
    x, weights = token_data(vocabulary=512)
    rows = []
    for m in model_axes:
        mesh = mesh_of(1, m)
        with sharded(mesh, Gemma.get_layout_map(mesh)).scope():
            teacher = gemma(MEMORY_TEACHER, 0, vocabulary=512, heads=8)
        keras.distribution.set_distribution(sharded(mesh))
        try:
            student = gemma(STUDENT, 1, vocabulary=512)
            d = distiller(teacher, student, fused=True)
            analysis = lowered_step(d, x, weights).memory_analysis()
        finally:
            keras.distribution.set_distribution(None)
        rows.append({
            "model_axis": m,
            "argument_bytes": int(analysis.argument_size_in_bytes),
            "temp_bytes": int(analysis.temp_size_in_bytes),
            "teacher_bytes": sum(int(v.value.nbytes)
                                 for v in teacher.weights),
            "teacher_shard_bytes": max(
                sum(int(s.data.nbytes) for v in teacher.weights
                    for s in v.value.addressable_shards
                    if s.device == device)
                for device in mesh.devices.flat),
            "teacher_replicated_bytes": sum(
                int(v.value.nbytes) for v in teacher.weights
                if v.value.sharding.is_fully_replicated),
        })
    return rows


def cache():
    """A per-token top-k cache from a sharded teacher and from the same
    teacher on one device."""
    x, _ = token_data()
    weights = numpy_weights(gemma(TEACHER, 0))
    reference = keras_kd.cache_teacher_outputs(
        gemma(TEACHER, 0, weights), x, batch_size=4, top_k=8, verbose=0)
    mesh = mesh_of(2, 4)
    distribution = sharded(mesh, Gemma.get_layout_map(mesh))
    with distribution.scope():
        teacher = gemma(TEACHER, 0, weights)
        cached = keras_kd.cache_teacher_outputs(
            teacher, x, batch_size=4, top_k=8, verbose=0)
    ref, got = reference.arrays, cached.arrays
    return {"keys": sorted(got) == sorted(ref),
            "max_diff": {k: float(np.abs(np.asarray(ref[k], "float64") -
                                         np.asarray(got[k], "float64"))
                                  .max()) for k in ref}}


def extension_distiller(teacher, student, kind):
    terms = [keras_kd.Term(keras_kd.losses.KD(2.0), 0.9)]
    if kind == "local_modules":
        extra = dict(local_modules=keras_kd.LocalModules(
            ["s_stage1", "s_stage2"], ["t_stage1", "t_stage2"]))
    else:
        extra = dict(layerwise_lr=keras_kd.LayerwiseLearningRate(
            [("s_stage1", "t_stage1"), ("s_stage2", "t_stage2")],
            signal="attention", update_every=1))
    d = keras_kd.Distiller(teacher, student, terms=terms,
                           student_loss_weight=0.1, **extra)
    d.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
              loss=keras.losses.SparseCategoricalCrossentropy(
                  from_logits=True))
    return d


def extensions():
    """Local modules and layer-wise learning rates with a CNN teacher
    whose kernels are split on the model axis, against one device."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 5, size=16)
    keras.utils.set_random_seed(0)
    teacher_weights = numpy_weights(make_cnn("t", 8, batchnorm=False))
    student_weights = numpy_weights(make_cnn("s", 4, batchnorm=False))
    mesh = mesh_of(2, 4)
    layout = keras.distribution.LayoutMap(mesh)
    layout["t_stage.*kernel"] = (None, None, None, "model")
    layout["t_logits.*kernel"] = ("model", None)
    out = {}
    for kind in ("local_modules", "layerwise_lr"):
        runs = []
        for distribution in (None, sharded(mesh)):
            scope = sharded(mesh, layout) if distribution else None
            keras.distribution.set_distribution(scope)
            teacher = make_cnn("t", 8, batchnorm=False)
            keras.distribution.set_distribution(distribution)
            try:
                student = make_cnn("s", 4, batchnorm=False)
                teacher.set_weights(teacher_weights)
                student.set_weights(student_weights)
                keras.utils.set_random_seed(1)  # the same adapters
                d = extension_distiller(teacher, student, kind)
                history = d.fit(x, y, batch_size=16, epochs=STEPS,
                                verbose=0, shuffle=False)
            finally:
                keras.distribution.set_distribution(None)
            runs.append((history.history["loss"], numpy_weights(student),
                         shard_shapes(teacher)))
        (ref_loss, ref_w, _), (loss, w, shards) = runs
        out[kind] = {"reference_loss": ref_loss, "loss": loss,
                     "max_weight_diff": max(float(np.abs(a - b).max())
                                            for a, b in zip(ref_w, w)),
                     "teacher_shards": shards}
    return out


PARTS = {"train": train, "memory": memory, "cache": cache,
         "extensions": extensions}

if __name__ == "__main__":
    names = sys.argv[1:] or list(PARTS)
    print("RESULT" + json.dumps({name: PARTS[name]() for name in names}))
