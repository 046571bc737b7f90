"""Teacher saliency on a sharded data-parallel gang: N ranks, the frozen teacher's parameters sharded across
them with FSDP2 (`torch.distributed.fsdp.fully_shard`), every rank scoring its own batch at the same time.

Why: a teacher too large for one GPU under `device_map="auto"` is pipeline sharding without a pipeline (only
one GPU computes at any moment). Here each rank holds ≈ 1/N of the parameters and all ranks compute at once;
the price is an all-gather of each block's parameters in the forward and again in the backward
(docs/large-teachers.md).

The pure part, unit-tested on CPU with gloo (`tests/test_sharded_teacher.py`):

- :func:`shard_frozen_teacher`: eval mode, every parameter frozen, one FSDP unit per transformer block
  (`GradientCheckpointingLayer`) plus the root (embeddings, final norm, head; tied weights stay in one unit),
  each block resharded after its forward.
- :func:`gang_token_saliency`: :func:`leaf_ray.detect.saliency.token_saliency`'s numbers for a sharded model.
  The input embeddings are taken *inside* the model's forward (a forward hook on the embedding module turns
  its output into the leaf we differentiate by), because the root's parameters are only gathered while the
  root runs. With every parameter frozen, FSDP2 still gathers each block again before its backward: its
  pre-backward hook hangs on the block's *outputs*, which require grad through the embeddings (the test counts
  those gathers). It always runs one forward and one backward, also for a batch with no target, so that all
  ranks issue the same collectives.
- :func:`dummy_batch`: what a rank with no batch left scores so that the collectives line up.

The Ray part (`GangTeacherScorer`, `GangRank`: a placement group of rank actors behind one Ray Data actor)
is below.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import socket
import time

import pyarrow as pa
import torch

from leaf_ray.detect.saliency import (
    SaliencyOutput,
    _check_inputs,
    checkpointed_layers,
    frozen_eval,
    position_ids_from_mask,
    target_loss,
)
from leaf_ray.detect.stages import SaliencyScorer

# --------------------------------------------------------------------------- the pure part


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no transformer blocks (GradientCheckpointingLayer) to "
                         "shard; use detection.teacher_pool.mode=device_map for this model")
    return blocks


def shard_frozen_teacher(model: torch.nn.Module, mesh=None) -> torch.nn.Module:
    """Freeze `model` (eval, requires_grad False) and shard it over `mesh` (default: the whole default process
    group on the model's device type) with FSDP2: one unit per block, resharded after its forward, and the
    root. Returns the same module, now an `FSDPModule`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model.eval().requires_grad_(False)
    if mesh is None:
        import torch.distributed as dist

        device_type = next(model.parameters()).device.type
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return model


def load_sharded_teacher(ref, dtype: str, mesh, device: torch.device | None = None) -> tuple[torch.nn.Module, int]:
    """`ref`'s model sharded over `mesh` by :func:`shard_frozen_teacher`, each rank reading only its own shards
    from the safetensors checkpoint (:func:`leaf_ray.partitioned_load.load_fsdp_sharded`): no rank ever holds
    the whole model. A checkpoint without safetensors is loaded whole on every rank, then sharded. Returns
    ``(model, checkpoint bytes this rank read)``."""
    from leaf_ray.models import load_model, model_dtype
    from leaf_ray.partitioned_load import checkpoint_dir, has_safetensors, load_fsdp_sharded

    on_cpu = mesh.device_type == "cpu"
    if device is None:
        device = torch.device("cpu") if on_cpu else torch.device(mesh.device_type, torch.cuda.current_device())
    if has_safetensors(ref):
        return load_fsdp_sharded(ref, model_dtype(ref, dtype, on_cpu=on_cpu),
                                 lambda m: shard_frozen_teacher(m, mesh), device=device)
    # Loaded on CPU, then each FSDP unit is moved to the mesh's device as it is sharded.
    model = shard_frozen_teacher(load_model(ref, dtype=dtype, device=device.type), mesh)
    return model, sum(f.stat().st_size for f in checkpoint_dir(ref).glob("*.bin"))


def local_parameter_numel(model: torch.nn.Module) -> tuple[int, int]:
    """(elements of the parameters this rank holds, elements of the whole model)."""
    local = full = 0
    for p in model.parameters():
        full += p.numel()
        local += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
    return local, full


def dummy_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, target_mask) of one 2-token sample with one target: a full forward and
    backward through every block, at almost no cost."""
    ids = torch.zeros(1, 2, dtype=torch.long)
    return ids, torch.ones_like(ids), torch.tensor([[0, 1]])


@contextlib.contextmanager
def _embeddings_as_leaf(model: torch.nn.Module, store: list):
    """The input embedding module's output replaced by a detached copy that requires grad (kept in `store`)."""
    def hook(_module, _args, output):
        leaf = output.detach().requires_grad_(True)
        store.append(leaf)
        return leaf

    handle = model.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def gang_token_saliency(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        target_mask: torch.Tensor, *, gradient_checkpointing: bool = False) -> SaliencyOutput:
    """``g_t = ||dL_b/de_t||_2`` for every token of a padded batch, on a model sharded by
    :func:`shard_frozen_teacher` (or an unsharded one: the same numbers as `token_saliency`). Collective:
    every rank of the gang must call it the same number of times (pad with :func:`dummy_batch`).
    ``gradient_checkpointing``: each block's forward is checkpointed inside its FSDP unit (recomputed in the
    backward after the unit's pre-backward gather), so activations are one block's, not every block's."""
    _check_inputs(input_ids, attention_mask, target_mask)
    device = _compute_device(model)
    input_ids = input_ids.to(device).clone()
    attention_mask = attention_mask.to(device).long().clone()
    target = target_mask.to(device).bool().clone()
    length = input_ids.shape[1]
    num_targets = target.sum(-1)
    has_target = target.any(0).nonzero()
    first_target = int(has_target[0]) if has_target.numel() else length - 1
    keep = length - first_target + 1
    kwargs = {"logits_to_keep": keep} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    leaves: list[torch.Tensor] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(frozen_eval(model))
        if gradient_checkpointing:
            stack.enter_context(checkpointed_layers(model))
        stack.enter_context(_embeddings_as_leaf(model, leaves))
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids_from_mask(attention_mask), use_cache=False, **kwargs).logits
        logits = logits[:, -keep:]
        per_sample_loss, n_target_rows = target_loss(logits, input_ids, target, num_targets)
        # A batch without targets still runs the backward (0 · the logits), so that every rank's FSDP units
        # gather in the backward as on the others.
        total = per_sample_loss.sum() if n_target_rows else logits.float().sum() * 0.0
        (grad,) = torch.autograd.grad(total, leaves[0])
    grad_norm = grad.float().norm(dim=-1).masked_fill(attention_mask == 0, 0.0)
    return SaliencyOutput(grad_norm=grad_norm, loss=per_sample_loss.detach(), num_targets=num_targets)


def _compute_device(model) -> torch.device:
    """Where the inputs go: the device of the (possibly sharded) embedding weight."""
    weight = model.get_input_embeddings().weight
    return weight.to_local().device if hasattr(weight, "to_local") else weight.device


# --------------------------------------------------------------------------- the Ray part


class GangRank(SaliencyScorer):
    """One rank of a gang (a Ray actor): joins the gang's process group (nccl on its GPU, gloo on CPU), loads the
    teacher, shards it (:func:`shard_frozen_teacher`) and scores the slices it is given exactly like
    `SaliencyScorer` (own tokenizer, quarantine of non-finite scores), with one sharded pass per call: a
    slice with nothing to score runs :func:`dummy_batch`."""

    def __init__(self, rank: int, world_size: int, model: dict, *, dtype: str, own_tokenizer: bool,
                 fail_at_batch: int | None = None, num_gpus: float = 0.0, gradient_checkpointing: bool = False):
        from leaf_ray.config import ModelRef
        from leaf_ray.raycluster import cached_tokenizer

        self.rank, self.world_size, self.model_kwargs, self.dtype = rank, world_size, model, dtype
        self.num_gpus = num_gpus
        self.role, self.gradient_checkpointing = "teacher", gradient_checkpointing
        ref = ModelRef(**model)
        self.tokenizer = cached_tokenizer(ref.model_dump_json()) if own_tokenizer else None
        self.fail_at_batch, self.batches, self.passes = fail_at_batch, 0, 0
        self.model = None

    def address(self) -> str:
        """`tcp://ip:port` of a free port on this rank's node (rank 0 hosts the rendezvous)."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def join(self, init_method: str, timeout_s: float) -> tuple[int, int]:
        """Join the gang and shard the teacher; returns (parameters held here, parameters of the model)."""
        from torch.distributed.device_mesh import init_device_mesh

        from leaf_ray.config import ModelRef
        from leaf_ray.distributed import init_group, ray_actor_device

        # The GPU Ray gave this rank (CUDA_VISIBLE_DEVICES narrowed to it), else the CPU: a rank's device comes
        # from its resources, never from what it happens to see.
        device = ray_actor_device(self.num_gpus)
        init_group(device, rank=self.rank, world_size=self.world_size, init_method=init_method, timeout_s=timeout_s)
        mesh = init_device_mesh(device.type, (self.world_size,))
        self.model, self.bytes_read = load_sharded_teacher(ModelRef(**self.model_kwargs), self.dtype, mesh,
                                                           device=device)
        return local_parameter_numel(self.model)

    def pid(self) -> int:
        return os.getpid()

    def score(self, batch: pa.Table) -> pa.Table:
        self.batches += 1
        if self.fail_at_batch is not None and self.batches >= self.fail_at_batch:
            os._exit(1)  # TESTING ONLY (detection.teacher_pool.fail_rank_at_batch): a rank dies mid-run
        passes = self.passes
        out = self(batch)
        if self.passes == passes:  # nothing of this slice reached the model: keep the collectives in step
            self._saliency(*dummy_batch())
        return out

    def _saliency(self, input_ids, attention_mask, target_mask):
        self.passes += 1
        return gang_token_saliency(self.model, input_ids, attention_mask, target_mask,
                                   gradient_checkpointing=self.gradient_checkpointing)


class GangTeacherScorer:
    """A Ray Data actor of the teacher pool in mode `sharded`: owns a gang of `world_size` `GangRank` actors
    in one STRICT_PACK placement group, splits each batch (sorted by length) into `world_size` contiguous
    slices, scores them on all ranks at once and returns the rows in their order, with `teacher_grad_norm` and
    `teacher_loss` as `SaliencyScorer` adds them.

    A rank that dies fails the batch on every rank (the others are stuck in a collective and are killed): the
    gang is rebuilt (at most `max_gang_restarts` times) and the same batch is scored again. Nothing of it was
    returned, so nothing was committed: no unit is lost or duplicated. Past that, the error ends the run and
    a rerun resumes from the committed parts, like the `device_map` stream.
    """

    def __init__(self, model: dict, *, dtype: str, own_tokenizer: bool, world_size: int,
                 rank_resources: dict[str, float], gang_timeout_s: float, max_gang_restarts: int,
                 fail_rank_at_batch: int | None = None, gang_tag: str = "leaf-ray-teacher-gang",
                 gradient_checkpointing: bool = False):
        self.gang_tag, self.gradient_checkpointing = gang_tag, gradient_checkpointing
        self.model, self.dtype, self.own_tokenizer = model, dtype, own_tokenizer
        self.world_size, self.rank_resources = world_size, dict(rank_resources)
        self.timeout_s, self.restarts_left = gang_timeout_s, max_gang_restarts
        self.fail_rank_at_batch = fail_rank_at_batch
        self.gangs_started, self.ranks, self.pg = 0, [], None
        self._start_gang()

    def _start_gang(self) -> None:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = {k: v for k, v in self.rank_resources.items() if v}
        # A placement group made by an actor lives until the job ends: the driver removes those named with
        # its tag when the stream is over (`remove_gang_placement_groups`), and a rebuilt gang its old one.
        self.pg = placement_group([bundle] * self.world_size, strategy="STRICT_PACK", name=self.gang_tag)
        try:  # bounded: a gang the cluster can never place is an error, not a wait forever
            ray.get(self.pg.ready(), timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            raise RuntimeError(f"the teacher gang's {self.world_size} bundles of {bundle} on one node (STRICT_PACK) "
                               f"were not placed within detection.teacher_pool.gang_timeout_s={self.timeout_s:g} s; "
                               "no node has that much free (see `ray status`)") from None
        fail = self.fail_rank_at_batch if self.gangs_started == 0 else None
        self.gangs_started += 1
        actor = ray.remote(GangRank)
        self.ranks = [actor.options(
            num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
            resources={k: v for k, v in bundle.items() if k not in ("CPU", "GPU")},
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r),
        ).remote(r, self.world_size, self.model, dtype=self.dtype, own_tokenizer=self.own_tokenizer,
                 gradient_checkpointing=self.gradient_checkpointing, fail_at_batch=fail if r == self.world_size - 1 else None, num_gpus=bundle.get("GPU", 0))
            for r in range(self.world_size)]
        init_method = ray.get(self.ranks[0].address.remote())
        self.held = self._all([rank.join.remote(init_method, self.timeout_s) for rank in self.ranks])

    def _stop_gang(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for rank in self.ranks:
            ray.kill(rank)
        if self.pg is not None:
            remove_placement_group(self.pg)
        self.ranks, self.pg = [], None

    def _all(self, refs: list) -> list:
        """Every result in order; the first failure is raised at once (not after the survivors' timeout)."""
        import ray

        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)  # raises if that rank failed
        return ray.get(refs)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import ray

        n, world = batch.num_rows, self.world_size
        bounds = [n * r // world for r in range(world + 1)]
        slices = [batch.slice(bounds[r], bounds[r + 1] - bounds[r]) for r in range(world)]
        while True:
            try:
                outs = self._all([rank.score.remote(s) for rank, s in zip(self.ranks, slices)])
                return pa.concat_tables(outs)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
                if self.restarts_left <= 0:
                    # A plain error, not the rank's RayActorError: Ray Data must fail the stream (a rerun
                    # resumes), not restart this actor, whose old gang's placement group is still reserved.
                    raise RuntimeError(f"the teacher gang lost a rank and has no restart left "
                                       f"(detection.teacher_pool.max_gang_restarts): {e}") from None
                self.restarts_left -= 1
                self._stop_gang()
                time.sleep(1.0)
                self._start_gang()


def gang_kwargs(cfg, same_tokenizer: bool, gang_tag: str) -> dict:
    """`GangTeacherScorer`'s constructor arguments from the config (detection.teacher_pool, mode sharded)."""
    pool = cfg.detection.teacher_pool
    return {"model": cfg.models.teacher.model_dump(), "dtype": cfg.detection.dtype,
            "own_tokenizer": not same_tokenizer, "world_size": pool.world_size,
            "rank_resources": pool.rank_resources(), "gang_timeout_s": pool.gang_timeout_s,
            "max_gang_restarts": pool.max_gang_restarts, "fail_rank_at_batch": pool.fail_rank_at_batch,
            "gang_tag": gang_tag, "gradient_checkpointing": cfg.detection.gradient_checkpointing}


def new_gang_tag() -> str:
    import uuid

    return f"leaf-ray-teacher-gang-{uuid.uuid4().hex[:12]}"


def remove_gang_placement_groups(gang_tag: str) -> int:
    """Remove the placement groups of this stream's gangs (their actors are gone with the Ray Data actors that
    owned them; the groups themselves would hold their resources until the job ends). Returns how many."""
    from ray.util import placement_group_table
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    removed = 0
    for pg_id, info in placement_group_table().items():
        if info.get("name") == gang_tag and info.get("state") != "REMOVED":
            from ray._raylet import PlacementGroupID

            remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
            removed += 1
    return removed
