"""Stage 2: causal attention distillation (hybrid KL) — loss, teacher signals, top-k cache, trainer."""

from leaf_ray.distill.loss import KLOutput, hybrid_kl_from_hidden, hybrid_kl_loss
from leaf_ray.distill.teacher import (
    OnlineTeacher,
    TeacherBatch,
    TeacherLogits,
    TeacherSignal,
    TeacherTopK,
    TopKCacheTeacher,
)

__all__ = ["KLOutput", "OnlineTeacher", "TeacherBatch", "TeacherLogits", "TeacherSignal", "TeacherTopK",
           "TopKCacheTeacher", "hybrid_kl_from_hidden", "hybrid_kl_loss"]
