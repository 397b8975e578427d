"""A run's DeviceMesh (replicate x shard x tensor) and tensor + sequence parallelism on it, with torch's own
DTensor styles (torch.distributed.tensor.parallel), as torchtitan applies them to its Llama.

The plan of a decoder layer's projections is the model's own: transformers' `base_model_tp_plan` (q/k/v and
gate/up column-wise, o and down row-wise). Kiln adds what makes it sequence parallel: the norms run on the
layer's sequence shard, attention and MLP gather the sequence first, the row-wise projections reduce-scatter
back onto it. The embeddings are split by vocabulary row and the LM head by vocabulary column; its logits stay
split, and the cross entropy runs on them where they are (torch's loss parallel): the same loss, without
gathering a vocabulary x sequence tensor on every rank.

Where a transformers decoder computes things from its input's length (rotary positions, the causal mask), it
sees the whole sequence: the embeddings' output is replicated and the first layer takes its own shard of it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)
from transformers import PreTrainedModel

from trainers.config import ConfigError, MeshShape
from trainers.config.parallel import MESH_DIMS, check_model_splits, tensor_group_problem
from trainers.distributed import broadcast_from_rank0, gather_to_rank0


@dataclass
class Mesh:
    """The run's DeviceMesh and the two views the strategy uses: FSDP2's data axes and the tensor axis."""

    shape: MeshShape
    device_mesh: DeviceMesh

    @property
    def data_mesh(self) -> DeviceMesh:
        """What FSDP2 shards over: (replicate, shard) is HSDP, shard alone plain FSDP."""
        if self.shape.replicate > 1:
            return self.device_mesh["replicate", "shard"]
        return self.device_mesh["shard"]

    @property
    def tensor_mesh(self) -> DeviceMesh:
        """The ranks of one tensor group."""
        return self.device_mesh["tensor"]


def build_mesh(shape: MeshShape, device_type: str) -> Mesh:
    """Collective: the world's DeviceMesh of shape (replicate, shard, tensor), on the existing process group."""
    sizes = (shape.replicate, shape.shard, shape.tensor)
    return Mesh(shape, init_device_mesh(device_type, sizes, mesh_dim_names=MESH_DIMS))


def keep_tensor_groups_on_one_node(mesh: MeshShape, node: str) -> None:
    """Collective: ConfigError on every rank when a tensor group's ranks run on different nodes (its collectives,
    every layer, would cross the network). node: this rank's (Ray's node id, else the host)."""
    nodes = gather_to_rank0(node)
    problem = broadcast_from_rank0(tensor_group_problem(mesh, nodes) if nodes else None)
    if problem:
        raise ConfigError(problem)


def projection_styles(model: PreTrainedModel) -> dict[str, ParallelStyle]:
    """A decoder layer's projection styles from the model's own plan ("layers.*.NAME": style), sequence parallel."""
    plan = getattr(model.config, "base_model_tp_plan", None) or {}
    styles: dict[str, ParallelStyle] = {}
    for pattern, style in plan.items():
        name = pattern.removeprefix("layers.*.")
        if style == "colwise":
            styles[name] = ColwiseParallel()
        elif style == "rowwise":
            styles[name] = RowwiseParallel(output_layouts=Shard(1))  # reduce-scattered onto the sequence shard
        elif style == "replicated_with_grad_allreduce" and name.endswith("_norm"):
            # Qwen3's per-head q/k norms: replicated weights over this rank's heads (dim 2), gradients summed.
            styles[name] = SequenceParallel(sequence_dim=2, use_local_output=True)
        else:
            arch = model.config.model_type
            raise ConfigError(
                f"parallel.tensor with model.arch={arch}: its tensor-parallel plan has {pattern}: {style}, which "
                "Kiln cannot apply; use parallel.tensor=1"
            )
    return styles


def layer_plan(model: PreTrainedModel) -> dict[str, ParallelStyle]:
    """One decoder layer, sequence parallel: norms on the shard, attention and MLP on the gathered sequence."""
    return {
        "input_layernorm": SequenceParallel(),
        "self_attn": PrepareModuleInput(
            input_kwarg_layouts={"hidden_states": Shard(1)}, desired_input_kwarg_layouts={"hidden_states": Replicate()}
        ),
        "post_attention_layernorm": SequenceParallel(),
        "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        **projection_styles(model),
    }


def check_tensor_parallel(model: PreTrainedModel, tensor: int) -> None:
    """The model (built from config, or a model.init_from folder's) can be split T ways; ConfigError if not."""
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    check_model_splits(tensor, config.model_type, heads, kv_heads, where="the model's config")


def apply_tensor_parallel(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Split model's layers, embeddings and LM head over mesh (one tensor group), in place; returns model."""
    if not isinstance(model, PreTrainedModel):
        raise ConfigError(f"parallel.tensor needs a transformers model, not {type(model).__name__}")
    check_tensor_parallel(model, mesh.size())
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embeddings.weight
    for index, layer in enumerate(getattr(model.get_decoder(), "layers")):  # noqa: B009 (a Module attribute)
        if index == 0:  # the replicated embeddings, cut to this rank's sequence shard
            parallelize_module(
                layer,
                mesh,
                PrepareModuleInput(
                    input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_output=True
                ),
            )
        parallelize_module(layer, mesh, layer_plan(model))
    parallelize_module(
        model,
        mesh,
        {
            "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
            "model.norm": SequenceParallel(),
            # Loss parallel: the logits stay split by vocabulary; the cross entropy (under sharded_logits())
            # reduces across the group instead of gathering vocabulary x sequence logits on every rank.
            "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
        },
    )
    if tied:  # both were split by vocabulary row (Shard(0)): one parameter again, as the model has it
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    model.register_forward_hook(plain_loss)
    return model


def plain_loss(module: nn.Module, args: object, output: object) -> object:
    """A forward's loss as this rank's plain tensor (every rank of the group holds the same value), so the loop adds
    and logs it as any strategy's; the logits stay a DTensor (`whole` gathers them where a task needs them)."""
    loss = getattr(output, "loss", None)
    if isinstance(loss, DTensor):
        output.loss = loss.to_local()  # type: ignore[attr-defined]  # a ModelOutput's field
    return output


def sharded_logits() -> AbstractContextManager:
    """Where vocabulary-split logits meet a cross entropy (a loss's forward and its backward): torch's loss parallel."""
    return loss_parallel()


def whole(value: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered into a plain tensor on this rank (a plain tensor as it is): argmax over a split vocabulary."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def local(value: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor's value on this rank, gradient kept (a plain tensor as it is)."""
    return value.to_local() if isinstance(value, DTensor) else value
