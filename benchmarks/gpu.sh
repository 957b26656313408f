#!/usr/bin/env bash
# Every GPU figure of keras-kd in one command, on the JAX backend:
#   1. step_overhead.py  distiller step vs teacher inference + student step,
#                        and vs keras.distillation (both students)
#   2. losses.py         Spearman / CMKD / DIST vs KD, forward + backward;
#                        a top-k (k=10) teacher vs dense teacher logits
#   3. memory.py         LAKD peak memory and step time vs end-to-end KD
#   4. lm_memory.py      token-level divergence, chunked vs unchunked: peak
#                        extra memory and step time at B=4, T=1024, V=32000
#   5. teacher_cache.py  an epoch distilled from a teacher cache vs the
#                        student alone (and live teacher, cache build, size)
#   6. layerwise.py      step time with layer-wise learning rates vs without
#   7. lm_cache.py       a per-token top-k LM teacher cache: size on disk,
#                        reading it vs recomputing the teacher
#   8. sharded_teacher.py  a Gemma-7B-shaped teacher (bfloat16) sharded on
#                        the model axis of a (1, M) mesh, M = 1, 2, 4, 8:
#                        per-device step memory and step time; needs 8
#                        accelerators and Keras Hub (run it by name:
#                        `bash benchmarks/gpu.sh out sharded_teacher`)
# and, only when named (each is the full 240-epoch CIFAR-100 recipe, hours):
#   cifar100_kd, cifar100_dist, cifar100_cmkd   cifar100.py, ResNet32x4 ->
#                        ResNet8x4 with KD, DIST and CMKD. They read
#                        $CIFAR100_DIR/cifar100.npz (default data/cifar100;
#                        `python benchmarks/cifar100.py --export-npz DIR`
#                        writes it where Keras can download) and the teacher
#                        $CIFAR_TEACHERS/resnet32x4_vanilla/ckpt_epoch_240.pth
#                        (mdistiller's cifar_teachers.tar; without it the
#                        teacher is trained first), with the NumPy input
#                        pipeline (no TensorFlow). A part stopped by its time
#                        limit resumes from its last epoch when run again
#                        with the same output folder.
# Made for a GPU machine that has JAX but no TensorFlow and no registry
# access: what it needs beyond JAX travels as wheels in .whl/ (see
# benchmarks/README.md, "GPU figures"). Each part has its own time limit; a
# part that runs out prints so. Parts 1-3 end within 8 minutes; all parts
# take up to 16, more than one 10-minute device command: name the parts to
# run, e.g. `bash benchmarks/gpu.sh out step_overhead losses lakd_memory`,
# then `bash benchmarks/gpu.sh out lm_memory teacher_cache layerwise lm_cache`.
#
# Usage: bash benchmarks/gpu.sh [output folder [part ...]]
#        (default: gpu_results, every part)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_results}"
shift $(( $# > 0 ? 1 : 0 ))
selected=" $* "
mkdir -p "$out"
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
python=${PYTHON:-python3}

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$python" -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target /tmp/keras_kd_site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/keras_kd_site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

"$python" - <<'PY' 2>&1 | tee "$out/environment.txt"
import platform, jax, keras, keras_kd
print("python", platform.python_version(), "| jax", jax.__version__,
      "| keras", keras.__version__, "| keras_kd", keras_kd.__version__)
print("devices:", jax.devices())
PY

part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  if [ "$selected" != "  " ] && [[ "$selected" != *" $name "* ]]; then
    return 0
  fi
  if [[ "$name" == cifar100_* ]] && [[ "$selected" != *" $name "* ]]; then
    return 0  # hours long: only when named
  fi
  echo "== $name (limit ${limit}s): $*" | tee "$out/$name.txt"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$out/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$out/$name.txt"
}

part step_overhead 180 "$python" benchmarks/step_overhead.py --backend jax \
  --rounds 24
part losses 180 "$python" benchmarks/losses.py
part lakd_memory 100 "$python" benchmarks/memory.py --backend jax \
  --split blocks --repeats 1 --steps 4
part lm_memory 120 "$python" benchmarks/lm_memory.py --backend jax \
  --repeats 1 --rounds 10
part teacher_cache 120 "$python" benchmarks/teacher_cache.py
part layerwise 120 "$python" benchmarks/layerwise.py --backend jax \
  --rounds 9
part lm_cache 120 "$python" benchmarks/lm_cache.py --backend jax
if [[ "$selected" == *" sharded_teacher "* ]]; then  # by name only
  part sharded_teacher 540 "$python" benchmarks/sharded_teacher.py \
    --size gemma_7b --dtype bfloat16 --model-axes 1,2,4,8 --steps 3
fi

cifar100_dir=${CIFAR100_DIR:-data/cifar100}
teacher_ckpt=${CIFAR_TEACHERS:-cifar_teachers}/resnet32x4_vanilla/ckpt_epoch_240.pth
teacher_args=()
if [ -f "$teacher_ckpt" ]; then
  teacher_args=(--teacher-checkpoint "$teacher_ckpt")
fi
for method in kd dist cmkd; do
  part "cifar100_$method" "${CIFAR100_LIMIT_S:-36000}" "$python" \
    benchmarks/cifar100.py --backend jax --teacher resnet32x4 \
    --student resnet8x4 --method "$method" --data-dir "$cifar100_dir" \
    --pipeline numpy --measure-pipeline --fit-verbose 2 \
    --out "$out/cifar100" ${teacher_args[@]+"${teacher_args[@]}"}
done
