"""Teacher sources: the interface a step asks for the teachers' outputs
(`keras_kd.teachers.source`), the live frozen teachers run in every step
(`keras_kd.teachers.live`) and the sparse top-k form of a teacher's
distribution that a teacher-output cache stores
(`keras_kd.teachers.topk`)."""

from keras_kd.teachers.live import ENSEMBLE_MODES
from keras_kd.teachers.live import LayerTaps
from keras_kd.teachers.live import TeacherOutputs
from keras_kd.teachers.live import Teachers
from keras_kd.teachers.live import as_teacher_list
from keras_kd.teachers.live import check_teacher_outputs
from keras_kd.teachers.live import check_teachers_apart
from keras_kd.teachers.live import ensemble_loss
from keras_kd.teachers.source import TeacherSource
from keras_kd.teachers.topk import TopKDistribution
from keras_kd.teachers.topk import top_k_distribution
