"""`leaf-ray plan`: before anything runs, whether each stage of a config fits its GPUs and host, and how long
the run takes — from the models' shapes, the config and a stated cluster shape (docs/large-teachers.md).

Everything here is arithmetic on shapes (no weights are read): a model's shape comes from its config.json
when the path exists, else from :data:`KNOWN_SHAPES` by the directory's name (the paper models).

Memory, per rank kind (``b`` = bytes per element of the stage's dtype, ``P`` = parameters, ``N`` = ranks
sharing a model, ``B × T`` = sequences × tokens of one step on that rank):

- weights: ``P·b`` whole, ``P·b/N`` sharded (FSDP2 gang, ZeRO-3); FSDP2/ZeRO-3 also hold gathered blocks:
  the root unit (embeddings + head: gathered for the whole forward) and two blocks (the current one and the
  prefetched next);
- student training (ZeRO stage z): gradients ``P·b`` (``/N`` from z=2), optimizer ``P·(4 master if b<4 +
  8 Adam)`` (``/N`` from z=1; 0 on the GPU with offload_optimizer);
- activations per token per layer, in elements: :data:`SALIENCY_ACT` (forward + input-gradient backward of a
  frozen model: no tensor is kept for weight gradients) or :data:`TRAINING_ACT` (the student), × layers; with
  gradient checkpointing only each block's input (``H``) per layer plus one block's full set;
- logits: saliency :data:`LOGIT_COPIES` ``B·T·V`` fp32 tensors live at the peak (logits, log-softmax,
  gradient). The student's hybrid KL (:mod:`leaf_ray.distill.loss`) visits ``distill.chunk_size`` target
  positions of the whole micro-batch at a time and holds :data:`KL_CHUNK_COPIES` fp32 ``[chunk, V]`` tensors
  per chunk; with its chunked head (ZeRO < 3) that is all, otherwise the model's ``B·T·V`` logits and their
  gradient buffer (both in the compute dtype) are live beside it;
- vLLM: weights ``P·b/tp`` plus the KV cache of one ``max_model_len`` sequence
  (``2·L·kv_heads·head_dim·b`` per token) must fit ``gpu_memory_utilization`` of the GPU.

Time: FLOPs from :mod:`leaf_ray.bench.flops` (saliency = forward + input backward, training = forward + full
backward, teacher forward) at ``mfu × gpu_tflops`` per GPU, plus all-gather traffic (``P·b·(N−1)/N`` per
gather) at the intra-node bandwidth. Compute and communication are added (no overlap assumed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from leaf_ray.bench.flops import Shape, forward_flops, saliency_flops, training_flops

GIB = 2**30
# The paper models' shapes (their public config.json), for planning where the weights are not on this machine.
KNOWN_SHAPES = {
    "Llama-3.3-70B-Instruct": (Shape(8192, 80, 64, 8, 28672, 128256, 128), False),
    "Llama-3.2-3B-Instruct": (Shape(3072, 28, 24, 8, 8192, 128256, 128), True),
    "Llama-3.2-1B-Instruct": (Shape(2048, 16, 32, 8, 8192, 128256, 64), True),
    "Qwen2.5-72B-Instruct": (Shape(8192, 80, 64, 8, 29568, 152064, 128), False),
    "Qwen2.5-Math-1.5B": (Shape(1536, 28, 12, 2, 8960, 151936, 128), True),
}
# Activation elements kept per token per layer (see the module docstring), as multiples of H and I.
SALIENCY_ACT = (8, 3)   # 8·H + 3·I: norms, attention inputs/outputs, the gated MLP's elementwise inputs
TRAINING_ACT = (10, 4)  # plus the inputs of every linear layer (kept for the weight gradients)
LOGIT_COPIES = 3
# fp32 [chunk, V] tensors of one hybrid-KL chunk: the student's logits, its log-probabilities, the teacher's,
# and the gradient rows (measured on CPU: 3.6-4 with forward/reverse KL, one more with JSD). The chunk is
# `chunk_size` target positions of the whole micro-batch (packed row-major), not chunk_size per sequence.
KL_CHUNK_COPIES = 4
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp32": 4, "bf16": 2, "fp16": 2}


class PlanError(ValueError):
    pass


@dataclass
class Cluster:
    """Per node (worker group): GPUs, GPU memory, host memory; and the assumed rates."""

    groups: dict[str, dict] = field(default_factory=dict)  # name -> {gpus, host_bytes, resources}
    gpu_mem_bytes: float = 80 * GIB
    bandwidth_gbps: float = 300.0    # intra-node all-gather GB/s per GPU (NVLink-class)
    gpu_tflops: float = 989.0        # dense bf16 peak per GPU (H100 SXM)
    mfu: float = 0.4

    def group_for(self, resources: dict[str, float]) -> tuple[str, dict]:
        """The worker group whose custom resources include every custom resource of a request."""
        custom = {k for k in resources if k not in ("CPU", "GPU", "memory")}
        for name, g in self.groups.items():
            if custom and custom <= set(g["resources"]):
                return name, g
        if self.groups:
            name = max(self.groups, key=lambda n: self.groups[n]["gpus"])
            return name, self.groups[name]
        return "node", {"gpus": 8, "host_bytes": 1e15, "resources": {}}


def cluster_from_manifest(path: str | Path, **rates) -> Cluster:
    """Worker groups of a KubeRay RayCluster manifest, through Ray's own KubeRay parsing."""
    import yaml
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d and d.get("kind") == "RayCluster"]
    if not docs:
        raise PlanError(f"{path}: no RayCluster document")
    cr = {**docs[0], "metadata": {**docs[0]["metadata"], "namespace": docs[0]["metadata"].get("namespace", "x")}}
    types = _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]
    groups = {name: {"gpus": int(t["resources"].get("GPU", 0)), "host_bytes": float(t["resources"].get("memory", 0)),
                     "resources": dict(t["resources"])}
              for name, t in types.items() if name != "headgroup"}
    return Cluster(groups=groups, **rates)


def model_shape(ref, role: str) -> tuple[Shape, bool]:
    """(shape, tied embeddings) of `ref`: its config.json, else the known paper model of that name."""
    path = Path(ref.path)
    cfg_file = path / "config.json"
    if cfg_file.is_file() and not ref.gguf_file:
        c = json.loads(cfg_file.read_text())
        c = c.get("text_config", c)
        return (Shape(c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                      c.get("num_key_value_heads") or c["num_attention_heads"], c["intermediate_size"],
                      c["vocab_size"], c.get("head_dim")), bool(c.get("tie_word_embeddings", False)))
    if ref.gguf_file and path.exists():
        from leaf_ray.models import model_config

        mc = model_config(ref)
        return Shape.from_config(mc), bool(getattr(mc, "tie_word_embeddings", False))
    if path.name in KNOWN_SHAPES:
        return KNOWN_SHAPES[path.name]
    raise PlanError(f"models.{role}.path: {ref.path} has no config.json here and is not one of the known "
                    f"models ({', '.join(KNOWN_SHAPES)})")


def n_params(shape: Shape, tied: bool) -> int:
    embed = shape.vocab * shape.hidden
    return shape.block_params + embed * (1 if tied else 2) + shape.layers * 2 * shape.hidden + shape.hidden


def activation_bytes(shape: Shape, tokens: int, b: int, coeffs: tuple[int, int], checkpointing: bool) -> float:
    per_layer = coeffs[0] * shape.hidden + coeffs[1] * shape.intermediate
    if checkpointing:
        return tokens * b * (shape.layers * shape.hidden + per_layer)
    return tokens * b * shape.layers * per_layer


def logits_bytes(shape: Shape, rows: int) -> float:
    return LOGIT_COPIES * rows * shape.vocab * 4


def gathered_bytes(shape: Shape, tied: bool, b: int) -> float:
    root = shape.vocab * shape.hidden * (1 if tied else 2)
    return b * (root + 2 * shape.layer_params)


@dataclass
class RankPlan:
    stage: str
    rank: str
    group: str
    gpus: int
    parts: dict[str, float]
    gpu_budget: float
    host_load: float
    host_budget: float
    seconds: float | None = None
    fix: str = ""
    items: float | None = None  # what the stage processes in `seconds` (saliency units, training rows)
    item: str = ""

    @property
    def throughput(self) -> float | None:
        return self.items / self.seconds if self.items and self.seconds else None

    @property
    def gpu_total(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.gpu_total <= self.gpu_budget and self.host_load <= self.host_budget


def saliency_peak(shape: Shape, tied: bool, *, batch: int, length: int, b: int, checkpointing: bool,
                  shards: int = 1) -> dict[str, float]:
    """The parts of one rank's peak memory while scoring a saliency batch of `batch` × `length` tokens."""
    parts = {"weights": n_params(shape, tied) * b / shards}
    if shards > 1:
        parts["gathered"] = gathered_bytes(shape, tied, b)
    parts["activations"] = activation_bytes(shape, batch * length, b, SALIENCY_ACT, checkpointing)
    parts["logits"] = logits_bytes(shape, batch * length)
    return parts


def training_peak(student: Shape, s_tied: bool, teacher: Shape, t_tied: bool, *, batch: int, length: int,
                  b: int, teacher_b: int, zero_stage: int, world: int, teacher_mode: str, offload_optimizer: bool,
                  chunked_head: bool, chunk_size: int) -> dict[str, float]:
    """The parts of one distillation worker's peak memory in a training step (student + online teacher)."""
    p = n_params(student, s_tied)
    parts = {"student weights": p * b / (world if zero_stage == 3 else 1),
             "student grads": p * b / (world if zero_stage >= 2 else 1),
             "optimizer": 0.0 if offload_optimizer else p * ((4 if b < 4 else 0) + 8) / (world if zero_stage >= 1
                                                                                         else 1)}
    if zero_stage == 3:
        parts["student gathered"] = gathered_bytes(student, s_tied, b)
    tokens = batch * length
    parts["student activations"] = activation_bytes(student, tokens, b, TRAINING_ACT, False)
    # One KL chunk is chunk_size positions of the whole micro-batch (leaf_ray.distill.loss._run_chunks); the
    # chunked head builds only those logits, else the model's [B, T, V] logits and their gradient buffer are
    # live too. (Counting chunk_size rows per sequence, as this did before, overestimated a CPU step by 30 %.)
    kl_chunk = KL_CHUNK_COPIES * min(chunk_size, tokens) * student.vocab * 4
    parts["student logits"] = kl_chunk + (0 if chunked_head else 2 * tokens * student.vocab * b)
    if teacher_mode != "topk_cache":
        pt = n_params(teacher, t_tied)
        parts["teacher weights"] = pt * teacher_b / (world if teacher_mode == "zero3" else 1)
        if teacher_mode == "zero3":
            parts["teacher gathered"] = gathered_bytes(teacher, t_tied, teacher_b)
        parts["teacher logits"] = tokens * teacher.vocab * teacher_b
    return parts


def _tokens_per_sample(cfg, mean_tokens: int | None) -> int:
    return mean_tokens or cfg.data.max_length // 2


def plan(cfg, cluster: Cluster, *, samples: int | None = None, mean_tokens: int | None = None) -> list[RankPlan]:
    """Every stage's rank kinds with their memory parts, budgets, time and verdict."""
    teacher, t_tied = model_shape(cfg.models.teacher, "teacher")
    student, s_tied = model_shape(cfg.models.student, "student")
    det, dist_cfg, gen = cfg.detection, cfg.distill, cfg.generation
    length = cfg.data.max_length
    flops_rate = cluster.mfu * cluster.gpu_tflops * 1e12
    bw = cluster.bandwidth_gbps * 1e9
    tok = _tokens_per_sample(cfg, mean_tokens)
    passes = 1 + (det.response.num_segments if det.response.enabled else 0)
    out: list[RankPlan] = []
    db = BYTES[det.dtype]

    # Stage 1: student saliency (one actor per GPU, the student whole)
    pool = det.student_pool
    gname, g = cluster.group_for(pool.ray_resources())
    parts = saliency_peak(student, s_tied, batch=pool.batch_size, length=length, b=db,
                          checkpointing=det.gradient_checkpointing)
    sec = None
    if samples:
        sec = samples * passes * saliency_flops(student, [tok], tok) / flops_rate / max(1, pool.max_actors)
    out.append(RankPlan("detect", "student saliency actor", gname, max(1, int(pool.num_gpus)), parts,
                        cluster.gpu_mem_bytes * max(1, pool.num_gpus), n_params(student, s_tied) * db,
                        g["host_bytes"], sec, "detection.student_pool.batch_size or detection.gradient_checkpointing",
                        items=samples and samples * passes, item="units"))

    # Stage 1: teacher saliency
    tp = det.teacher_pool
    gname, g = cluster.group_for(tp.ray_resources())
    pt = n_params(teacher, t_tied)
    if tp.mode == "sharded":
        world = tp.world_size
        # a gang rank scores its own batch_size units (the gang's Ray Data batch is batch_size × world_size)
        parts = saliency_peak(teacher, t_tied, batch=tp.batch_size, length=length, b=db,
                              checkpointing=det.gradient_checkpointing, shards=world)
        # partitioned loading: each rank stages one tensor slice at a time in host memory
        largest = teacher.vocab * teacher.hidden * db / world
        host = world * largest
        budget = cluster.gpu_mem_bytes
        rank_kind = f"teacher gang rank (1/{world})"
        fix = "detection.teacher_pool.batch_size, world_size or detection.gradient_checkpointing"
        comm = 2 * pt * db * (world - 1) / world / bw  # gathered in the forward and again in the backward
    else:
        gpus = max(1, int(tp.num_gpus))
        parts = saliency_peak(teacher, t_tied, batch=tp.batch_size, length=length, b=db,
                              checkpointing=det.gradient_checkpointing)
        budget, host, comm, rank_kind = cluster.gpu_mem_bytes * gpus, pt * db, 0.0, f"teacher actor ({gpus} GPUs)"
        fix = "detection.teacher_pool.mode=sharded or detection.teacher_pool.batch_size"
        world = 1
    sec = None
    if samples:
        batches = samples * passes / (tp.batch_size * world)  # gang batches: each gathers every block
        compute = samples * passes * saliency_flops(teacher, [tok], tok) / (flops_rate * world)
        sec = (compute + batches * comm) / max(1, tp.max_actors)
    out.append(RankPlan("detect", rank_kind, gname, 1 if tp.mode == "sharded" else max(1, int(tp.num_gpus)),
                        parts, budget, host, g["host_bytes"], sec, fix, items=samples and samples * passes,
                        item="units"))

    # Stage 2: distillation worker
    res = dist_cfg.resources
    gname, g = cluster.group_for({**res.resources})
    world = res.num_workers
    sb = BYTES[dist_cfg.deepspeed.precision]
    zs = dist_cfg.deepspeed.zero_stage
    parts = training_peak(student, s_tied, teacher, t_tied, batch=dist_cfg.micro_batch_size, length=length, b=sb,
                          teacher_b=BYTES[cfg.models.teacher.dtype], zero_stage=zs, world=world,
                          teacher_mode=dist_cfg.teacher_mode, offload_optimizer=dist_cfg.deepspeed.offload_optimizer,
                          chunked_head=dist_cfg.chunked_lm_head and zs < 3, chunk_size=dist_cfg.chunk_size)
    ps = n_params(student, s_tied)
    tb = BYTES[cfg.models.teacher.dtype]
    # partitioned loading (ZeRO-3) stages one slice of one tensor at a time in host memory; a whole load
    # (from_pretrained) holds the model there before it moves to the GPU
    host = (ps * 4 if zs < 3 else student.vocab * student.hidden * sb / world) + (
        0 if dist_cfg.teacher_mode == "topk_cache" else
        teacher.vocab * teacher.hidden * tb / world if dist_cfg.teacher_mode == "zero3" else pt * tb)
    host *= min(world, max(1, g["gpus"]))  # workers of one node load at once
    sec = rows = None
    if samples:
        rows = samples * dist_cfg.epochs * (2 if dist_cfg.use_counterfactuals else 1)
        compute = rows * (training_flops(student, [tok], tok) + forward_flops(teacher, [tok], tok)) / (
            flops_rate * world)
        steps = rows / (dist_cfg.micro_batch_size * world)
        gathers = (3 * ps * sb if zs == 3 else 2 * ps * sb if zs >= 1 else 0) + (
            pt * BYTES[cfg.models.teacher.dtype] if dist_cfg.teacher_mode == "zero3" else 0)
        sec = compute + steps * gathers * (world - 1) / world / bw
    out.append(RankPlan("distill", f"training worker (1 of {world}, ZeRO-{zs}, teacher {dist_cfg.teacher_mode})",
                        gname, max(1, int(res.gpus_per_worker)), parts, cluster.gpu_mem_bytes *
                        max(1.0, res.gpus_per_worker), host, g["host_bytes"], sec,
                        "distill.micro_batch_size, data.max_length, distill.teacher_mode or "
                        "distill.deepspeed.zero_stage", items=rows, item="rows"))

    # vLLM generation (teacher responses, selection, evaluation): the pool holds the teacher
    if gen.backend in ("vllm", "auto") and gen.pool.num_gpus:
        kw = gen.vllm_engine_kwargs
        tpar = int(kw.get("tensor_parallel_size", 1))
        util = float(kw.get("gpu_memory_utilization", 0.9))
        max_len = int(kw.get("max_model_len", length))
        gb = BYTES[cfg.models.teacher.dtype]
        kv = 2 * teacher.layers * teacher.kv_heads * teacher.dim * gb * max_len / tpar
        parts = {"weights": pt * gb / tpar, "kv cache (1 sequence)": kv}
        gname, g = cluster.group_for(gen.pool.ray_resources())
        out.append(RankPlan("generate", f"vLLM teacher (tp {tpar})", gname, 1, parts,
                            cluster.gpu_mem_bytes * util, pt * gb / tpar * tpar, g["host_bytes"], None,
                            "generation.vllm_engine_kwargs.tensor_parallel_size or max_model_len"))
    return out


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


COLUMNS = ("stage", "rank", "group", "GPU memory parts", "GPU total / budget", "host at load / node", "time",
           "throughput", "verdict")


def table_rows(plans: list[RankPlan]) -> list[tuple[str, ...]]:
    """One row of :data:`COLUMNS` per rank kind (GiB per GPU; host GiB per node)."""
    out = []
    for p in plans:
        parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in p.parts.items())
        rate = "" if p.throughput is None else f"{p.throughput:.1f} {p.item}/s"
        verdict = "fits" if p.fits else f"does not fit: change {p.fix}"
        out.append((p.stage, p.rank, p.group, parts, f"{p.gpu_total / GIB:.1f} / {p.gpu_budget / GIB:.1f}",
                    f"{p.host_load / GIB:.1f} / {p.host_budget / GIB:.0f}", _duration(p.seconds), rate, verdict))
    return out


def render(plans: list[RankPlan], console, markdown: bool = False) -> None:
    """The plan as a terminal table, or (``markdown``) as a Markdown table for docs."""
    if markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(row) + " |" for row in table_rows(plans)]
        print("\n".join(lines))
        return
    from rich.table import Table

    table = Table(title="leaf-ray plan (GiB per GPU; time at the stated MFU)")
    for col in COLUMNS:
        table.add_column(col)
    for row in table_rows(plans):
        table.add_row(*row)
    console.print(table)
