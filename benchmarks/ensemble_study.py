"""Ensemble distillation under weak and strong augmentation, in miniature.

The setting of "Why does Knowledge Distillation Work? Rethink its Attention
and Fidelity Mechanism" (Guo et al.) on scikit-learn's bundled digits (no
download): two teachers (same architecture, different initialisations), each
trained with the weak or the strong augmentation preset, and a small student
distilled from the two under the weak or the strong preset -- all eight
combinations T1{w,s} T2{w,s} S{w,s}. During distillation every teacher sees
its own training augmentation and the student its own (per-model
augmentation); the loss is the paper's: cross-entropy plus the mean over
teachers of Hinton KD (tau = 10, hard-label weight 0.2).

For each combination it reports, as means over student seeds:
- affinity: mean affinity of the three models' augmentations, each measured
  as `keras_kd.affinity` of a reference CNN trained without augmentation
  (accuracy on augmented over clean held-out data; lower = stronger);
- teacher IoU: attention IoU between the two teachers' class activation
  maps, during distillation (each on its own augmented view; last epoch)
  and on the clean held-out data;
- fidelity: top-1 agreement and KL(teacher || student) on held-out data;
- mutual information between teacher and student top-1 labels (held out);
- held-out student accuracy (mean and standard deviation over seeds; the
  students alone, without teachers, under each preset, for reference),
then the Pearson correlation, across the eight combinations, of student
accuracy with each measure, and writes a PNG of the diagnostics over epochs
(first seed, eight runs).

Run (see benchmarks/README.md for the recorded time):
    python benchmarks/ensemble_study.py --out benchmarks/ensemble_study.png
"""

import argparse
import itertools
import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import keras_kd  # noqa: E402
from keras_kd import metrics as kd_metrics  # noqa: E402

CLASSES = 10
SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def cnn(prefix, width):
    """A small CNN for 8x8 digits; `<prefix>_stage2` is its last
    convolutional feature (4x4) and `<prefix>_logits` its classifier."""
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization(momentum=0.9)(x)
    x = keras.layers.Activation("relu", name=f"{prefix}_stage1")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(2 * width, 3, padding="same", use_bias=False)(x)
    x = keras.layers.BatchNormalization(momentum=0.9)(x)
    x = keras.layers.Activation("relu", name=f"{prefix}_stage2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(CLASSES, name=f"{prefix}_logits")(x)
    return keras.Model(inputs, outputs, name=prefix)


def augmentations(seed):
    return {
        "w": keras_kd.augment.weak(flip=False, translation=0.125, seed=seed),
        "s": keras_kd.augment.strong(flip=False, translation=0.125,
                                     rotation=0.05, zoom=0.1,
                                     erasing=(0.02, 0.1), seed=seed),
    }


def train_classifier(model, augmentation, x, y, epochs, seed):
    keras.utils.set_random_seed(seed)
    layers = [augmentation, model] if augmentation is not None else [model]
    wrapper = keras.Sequential(layers)
    wrapper.compile(optimizer=keras.optimizers.Adam(2e-3), loss=SCCE,
                    metrics=["accuracy"])
    wrapper.fit(x, y, epochs=epochs, batch_size=64, verbose=0)
    return model


def accuracy(model, x, y):
    return float(np.mean(model.predict(x, verbose=0).argmax(-1) == y))


def diagnostics(t1, t2, student):
    def iou(a, b, name):
        return kd_metrics.AttentionIoU(
            (a.name, b.name), (f"{a.name}_stage2", f"{b.name}_stage2"),
            (f"{a.name}_logits", f"{b.name}_logits"), name=name)

    return [kd_metrics.TopOneAgreement(), kd_metrics.TeacherKL(),
            kd_metrics.MutualInformation(),
            kd_metrics.ExpectedCalibrationError(),
            iou(t1, t2, "teacher_iou"),
            iou(t1, student, "teacher_student_iou")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=600,
                        help="training images (the rest are held out)")
    parser.add_argument("--teacher-epochs", type=int, default=60)
    parser.add_argument("--student-epochs", type=int, default=60)
    parser.add_argument("--student-width", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=2,
                        help="student seeds per combination")
    parser.add_argument("--out", default="ensemble_study.png")
    args = parser.parse_args()
    start, cpu_start = time.time(), time.process_time()

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    x_all = (digits.images[order, :, :, None] / 16.0).astype("float32")
    y_all = digits.target[order]
    x, y = x_all[:args.train], y_all[:args.train]
    x_test, y_test = x_all[args.train:], y_all[args.train:]

    augs = augmentations(seed=0)
    reference = train_classifier(cnn("ref", 32), None, x, y,
                                 args.teacher_epochs, seed=0)
    keras.utils.set_random_seed(0)
    affinity = {k: keras_kd.affinity(reference, (x_test, y_test), a)
                for k, a in augs.items()}
    print(f"reference CNN (no augmentation): held-out accuracy "
          f"{accuracy(reference, x_test, y_test):.4f}; affinity weak "
          f"{affinity['w']:.3f}, strong {affinity['s']:.3f}")

    teachers = {}
    for index, strength in itertools.product((1, 2), "ws"):
        name = f"t{index}{strength}"
        teachers[name] = train_classifier(
            cnn(name, 32), augs[strength], x, y, args.teacher_epochs,
            seed=10 * index)  # T1w/T1s share an init, as do T2w/T2s
        print(f"teacher {name}: held-out accuracy "
              f"{accuracy(teachers[name], x_test, y_test):.4f}")

    alone = {}
    for strength in "ws":
        scores = []
        for seed in range(args.seeds):
            student = train_classifier(
                cnn(f"alone{strength}{seed}", args.student_width),
                augmentations(seed=100 + seed)[strength], x, y,
                args.student_epochs, seed=100 + seed)
            scores.append(accuracy(student, x_test, y_test))
        alone[strength] = (np.mean(scores), np.std(scores))
        print(f"student alone, {strength} augmentation: held-out accuracy "
              f"{alone[strength][0]:.4f} +- {alone[strength][1]:.4f}")

    rows, histories = [], {}
    for a1, a2, a_s in itertools.product("ws", repeat=3):
        label = f"T1{a1} T2{a2} S{a_s}"
        t1, t2 = teachers[f"t1{a1}"], teachers[f"t2{a2}"]
        runs = []
        for seed in range(args.seeds):
            keras.utils.set_random_seed(100 + seed)
            student = cnn("s", args.student_width)
            run_augs = augmentations(seed=100 + seed)
            distiller = keras_kd.Distiller(
                [t1, t2], student,
                terms=[keras_kd.Term(keras_kd.losses.KD(temperature=10.0),
                                     weight=0.8)],
                student_loss_weight=0.2, ensemble="losses",
                teacher_augmentation=[run_augs[a1], run_augs[a2]],
                student_augmentation=run_augs[a_s],
                diagnostics=diagnostics(t1, t2, student))
            distiller.compile(optimizer=keras.optimizers.Adam(2e-3),
                              loss=SCCE, metrics=["accuracy"])
            # Validation every epoch (on 400 held-out images) for the first
            # seed only, for the PNG; every seed is evaluated on all the
            # held-out data at the end.
            history = distiller.fit(
                x, y, batch_size=64, epochs=args.student_epochs, verbose=0,
                validation_data=(x_test[:400], y_test[:400])
                if seed == 0 else None)
            if seed == 0:
                histories[label] = history.history
            held_out = distiller.evaluate(x_test, y_test, batch_size=256,
                                          return_dict=True, verbose=0)
            runs.append({
                "affinity": np.mean([affinity[a1], affinity[a2],
                                     affinity[a_s]]),
                "iou_train": history.history["teacher_iou"][-1],
                "iou_val": held_out["teacher_iou"],
                "agreement": held_out["top1_agreement"],
                "kl": held_out["teacher_kl"],
                "mi": held_out["mutual_information"],
                "accuracy": accuracy(student, x_test, y_test),
            })
        row = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
        row["accuracy_sd"] = float(np.std([r["accuracy"] for r in runs]))
        row["label"] = label
        rows.append(row)

    print(f"\n{len(x)} training and {len(x_test)} held-out digits; "
          f"teachers (width 32) {args.teacher_epochs} epochs, students "
          f"(width {args.student_width}) {args.student_epochs} epochs, "
          f"{args.seeds} student seeds")
    header = ("| combination | affinity | teacher IoU (train, aug) | "
              "teacher IoU (held out) | top-1 agreement | KL(T||S) | MI | "
              "student accuracy |")
    print(header)
    print("|" + "---|" * 8)
    for r in rows:
        print(f"| {r['label']} | {r['affinity']:.3f} | {r['iou_train']:.3f} "
              f"| {r['iou_val']:.3f} | {r['agreement']:.4f} | {r['kl']:.4f} "
              f"| {r['mi']:.3f} | {r['accuracy']:.4f} +- "
              f"{r['accuracy_sd']:.4f} |")
    acc = np.array([r["accuracy"] for r in rows])
    print("\nPearson r of student accuracy with, across the 8 combinations:")
    for key, name in (("affinity", "affinity"),
                      ("iou_train", "teacher IoU (train)"),
                      ("iou_val", "teacher IoU (held out)"),
                      ("agreement", "top-1 agreement"), ("kl", "KL(T||S)"),
                      ("mi", "mutual information")):
        values = np.array([r[key] for r in rows])
        print(f"  {name}: {np.corrcoef(values, acc)[0, 1]:+.2f}")
    for key, name in (("affinity", "affinity"),
                      ("agreement", "top-1 agreement"),
                      ("mi", "mutual information")):
        values = np.array([r[key] for r in rows])
        iou = [r["iou_train"] for r in rows]
        print(f"Pearson r of teacher IoU (train) with {name}: "
              f"{np.corrcoef(iou, values)[0, 1]:+.2f}")
    keras_kd.plot_diagnostics(
        histories, args.out,
        names=["top1_agreement", "teacher_kl", "mutual_information", "ece",
               "teacher_iou", "teacher_student_iou"])
    print(f"\nwrote {args.out}; wall time {time.time() - start:.0f} s, "
          f"process CPU time {time.process_time() - cpu_start:.0f} s")


if __name__ == "__main__":
    main()
