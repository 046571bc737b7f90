"""The DeepSpeed engines of distillation: the student wrapped with its loss, and the frozen teacher signal.

:func:`build_student` is the trainable student (a client AdamW, warm-up + decay schedule, ZeRO 0–3) around
:class:`StudentWithLoss`, the module that computes the hybrid KL (:mod:`leaf_ray.distill.loss`) inside the
engine. :func:`build_teacher` is the frozen teacher: replicated, ZeRO-3 partitioned, or the offline top-k
cache (:mod:`leaf_ray.distill.teacher`, :mod:`leaf_ray.distill.topk_cache`). Both are used by the recipe in
:mod:`leaf_ray.distill.trainer` and by ``leaf-ray bench distill``.
"""

from __future__ import annotations

from typing import Any

import torch

from leaf_ray.config import LeafConfig
from leaf_ray.registry import TEACHER_SIGNALS


def deepspeed_config(cfg: LeafConfig, world: int, accum: int, *, zero_stage: int, precision: str,
                     trains: bool = True) -> dict[str, Any]:
    dcfg, ds = cfg.distill, cfg.distill.deepspeed
    zero: dict[str, Any] = {"stage": zero_stage}
    if trains and ds.offload_optimizer and zero_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_param and zero_stage == 3:
        zero["offload_param"] = {"device": "cpu"}
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": dcfg.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": dcfg.micro_batch_size * accum * world,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if trains:
        conf.update({"gradient_clipping": dcfg.max_grad_norm,
                     # a client torch AdamW: nothing is JIT-compiled (DeepSpeed's own CPU Adam would be)
                     "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False})
    if precision == "bf16":
        conf["bf16"] = {"enabled": True}
    elif precision == "fp16":
        conf["fp16"] = {"enabled": True}
    return conf


class StudentWithLoss(torch.nn.Module):
    """The student LM and the hybrid KL as one module: DeepSpeed's engine wraps the whole loss computation
    (its backward hooks then sit on the loss itself).

    ``chunked_head``: the student's logits are built per chunk of target positions from the final hidden states
    and the LM head (:func:`hybrid_kl_from_hidden`), so no ``[B, T, V]`` logits tensor exists. Otherwise (ZeRO-3,
    whose LM head is partitioned; heads with soft-capping or scaling) the model's own logits are used.
    ``n_tokens``: the tokenizer's length; vocabulary rows past it are padding and are cut from the logits.
    """

    def __init__(self, model, dcfg, chunked_head: bool, n_tokens: int | None = None):
        super().__init__()
        self.model = model
        self.chunked_head = chunked_head
        self.n_tokens = n_tokens
        self.loss_kwargs = {"lambda_": dcfg.lambda_, "temperature": dcfg.temperature, "weighting": dcfg.weighting,
                            "chunk_size": dcfg.chunk_size, "divergence": dcfg.divergence, "jsd_beta": dcfg.jsd_beta}

    def forward(self, input_ids, attention_mask, target_mask, is_counterfactual, teacher) -> dict:
        from leaf_ray.distill.loss import hybrid_kl_from_hidden, hybrid_kl_loss

        if self.chunked_head:
            hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                              use_cache=False).last_hidden_state
            head, n = self.model.get_output_embeddings(), self.n_tokens
            kl = hybrid_kl_from_hidden(hidden, head.weight[:n], teacher, target_mask, is_counterfactual,
                                       lm_head_bias=None if head.bias is None else head.bias[:n],
                                       **self.loss_kwargs)
        else:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            kl = hybrid_kl_loss(logits[..., :self.n_tokens], teacher, target_mask, is_counterfactual,
                                **self.loss_kwargs)
        return dict(vars(kl))  # a dict: DeepSpeed hooks the tensors of dicts/tuples, not of dataclasses


def can_chunk_head(model, zero_stage: int) -> bool:
    """Plain linear LM heads whose weight is whole on every rank (not ZeRO-3)."""
    cfg = model.config
    capped = getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1.0)
    return zero_stage < 3 and not capped and isinstance(model.get_output_embeddings(), torch.nn.Linear)


def deepspeed_args(device: str | torch.device):
    """``deepspeed.initialize``'s ``args``: on CUDA the device index to build the engine on (DeepSpeed would
    otherwise take ``LOCAL_RANK``, which under Ray Train need not be the index of the GPU this worker was
    given); on CPU none (the CPU accelerator has one device)."""
    from types import SimpleNamespace

    device = torch.device(device)
    return SimpleNamespace(device_rank=device.index or 0) if device.type == "cuda" else None


def build_student(cfg: LeafConfig, world: int, accum: int, total_steps: int, *, with_loss: bool = True,
                  device: str | torch.device = "cpu"):
    """The student as a DeepSpeed engine with a client AdamW and a warm-up + decay LR schedule, on ``device``.

    Loaded in float32: DeepSpeed's bf16/fp16 mode casts the module and keeps the fp32 master weights in the
    optimizer. ZeRO-3 with a safetensors checkpoint: built partitioned instead (:func:`load_zero3_partitioned`).
    ``with_loss``: the engine wraps :class:`StudentWithLoss` (the trainer); else the bare LM (benchmarks)."""
    from leaf_ray.distill.ds_ops import import_deepspeed

    deepspeed = import_deepspeed()
    from transformers import get_scheduler

    from leaf_ray.models import PRECISIONS, compute_precision, load_model, load_tokenizer
    from leaf_ray.partitioned_load import has_safetensors, load_zero3_partitioned

    dcfg, ref = cfg.distill, cfg.models.student
    precision = compute_precision(dcfg.deepspeed.precision, on_cpu=torch.device(device).type == "cpu",
                                  force=ref.force_dtype)
    conf = deepspeed_config(cfg, world, accum, zero_stage=dcfg.deepspeed.zero_stage, precision=precision)
    if dcfg.deepspeed.zero_stage == 3 and has_safetensors(ref):
        # built partitioned, each rank reading only its partitions (no rank holds the whole student), in the
        # precision deepspeed.initialize would cast a whole fp32 model to; the optimizer's fp32 master
        # partitions are made from these, as from the cast module
        model, _ = load_zero3_partitioned(ref, PRECISIONS[precision], conf, device)
    else:
        model = load_model(ref, dtype="float32")
    model.config.use_cache = False
    if with_loss:
        chunked = dcfg.chunked_lm_head and can_chunk_head(model, dcfg.deepspeed.zero_stage)
        model = StudentWithLoss(model, dcfg, chunked_head=chunked,
                                n_tokens=len(load_tokenizer(cfg.models.student)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=dcfg.lr, weight_decay=dcfg.weight_decay)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[dcfg.scheduler]
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=dcfg.warmup_steps, num_training_steps=total_steps)
    engine, _, _, _ = deepspeed.initialize(args=deepspeed_args(device), model=model, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=conf)
    engine.train()
    return engine


def build_teacher(cfg: LeafConfig, world: int, accum: int, device):
    """The frozen teacher signal of the registered `distill.teacher_mode` (`TEACHER_SIGNALS`)."""
    return TEACHER_SIGNALS.get(cfg.distill.teacher_mode)(cfg, world, accum, device)


@TEACHER_SIGNALS.register("topk_cache")
def topk_cache_teacher(cfg: LeafConfig, world: int, accum: int, device):
    """The offline top-k cache, read from disk: no teacher model on the ranks."""
    from leaf_ray.distill.topk_cache import cache_dir_for, load_topk_teacher

    return load_topk_teacher(cache_dir_for(cfg))


def _frozen_teacher(cfg: LeafConfig, device):
    from leaf_ray.models import load_model

    # On the GPU in its configured dtype (bf16 stays bf16); on a CPU float32 where bf16 is not native.
    model = load_model(cfg.models.teacher, device=torch.device(device).type)
    model.requires_grad_(False)
    model.eval()
    return model


@TEACHER_SIGNALS.register("replicated")
def replicated_teacher(cfg: LeafConfig, world: int, accum: int, device):
    """A whole copy of the teacher on every rank."""
    from leaf_ray.distill.teacher import OnlineTeacher, TargetLogitsTeacher

    model = _frozen_teacher(cfg, device)
    model.to(device)
    return TargetLogitsTeacher(model) if can_chunk_head(model, zero_stage=0) else OnlineTeacher(model)


@TEACHER_SIGNALS.register("zero3")
def zero3_teacher(cfg: LeafConfig, world: int, accum: int, device):
    """The teacher partitioned across the ranks by DeepSpeed ZeRO-3 (inference only)."""
    from leaf_ray.distill.ds_ops import import_deepspeed
    from leaf_ray.distill.teacher import OnlineTeacher
    from leaf_ray.models import PRECISIONS, model_dtype
    from leaf_ray.partitioned_load import has_safetensors, load_zero3_partitioned

    ref = cfg.models.teacher
    # the dtype load_model settles on (float32 on a CPU without native bf16)
    dtype = model_dtype(ref, on_cpu=torch.device(device).type == "cpu")
    precision = {v: k for k, v in PRECISIONS.items()}[dtype]
    conf = deepspeed_config(cfg, world, accum, zero_stage=3, precision=precision, trains=False)
    if has_safetensors(ref):
        # built partitioned, each rank reading only its partitions: no rank holds the whole teacher
        model, _ = load_zero3_partitioned(ref, dtype, conf, device)
        model.requires_grad_(False)
    else:
        model = _frozen_teacher(cfg, device)
    model, _, _, _ = import_deepspeed().initialize(args=deepspeed_args(device), model=model, config=conf)
    model.eval()
    return OnlineTeacher(model)
