"""What shapes a checkpoint's parameters have, and whether a model fits them (any strategy's layout)."""

from __future__ import annotations

import glob
import os

from torch import nn

from data_pipeline import storage
from trainers.checkpoint import safe_load
from trainers.checkpoint.shards import CHECKPOINT_TAG
from trainers.errors import CheckpointError

MODEL_PREFIX = "model."


def checkpoint_shapes(shards_url: str, strategy: str) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape, as stored in a checkpoint's shards."""
    # Here, not at the top: trainers.checkpoint.store imports this module, and `kiln train`'s driver (which lists
    # checkpoints, never reads shards) would load torch's distributed checkpointing, ~0.8 s, before Ray starts.
    from trainers.checkpoint.dcp_read import read_metadata

    if strategy.startswith("zero"):
        with storage.local_folder(shards_url) as folder:
            # ZeRO-1/2 name it mp_rank_00_model_states.pt, ZeRO-3 zero_pp_rank_0_mp_rank_00_model_states.pt.
            found = sorted(glob.glob(os.path.join(folder, CHECKPOINT_TAG, "*mp_rank_00_model_states.pt")))
            if not found:
                raise CheckpointError(f"{shards_url} holds no DeepSpeed model states")
            # Only the shapes are needed: on the meta device no tensor bytes are read.
            states = safe_load.load_torch(found[0], found[0], map_location="meta", allow=safe_load.deepspeed_globals())
        shapes: dict[str, tuple[int, ...]] = {}
        for group in states["param_shapes"]:
            shapes.update({name: tuple(shape) for name, shape in group.items()})
        return shapes
    metadata = read_metadata(shards_url)
    return {
        key[len(MODEL_PREFIX) :]: tuple(meta.size)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(MODEL_PREFIX) and hasattr(meta, "size")
    }


def check_fits(model_shapes: dict[str, tuple[int, ...]], saved: dict[str, tuple[int, ...]], source: str) -> None:
    """Fail naming every parameter whose shape differs between the model and a checkpoint."""
    mismatched = [
        f"{name}: checkpoint {list(saved[name])} vs model {list(shape)}"
        for name, shape in model_shapes.items()
        if name in saved and tuple(saved[name]) != tuple(shape)
    ]
    if mismatched:
        shown = "; ".join(mismatched[:4]) + (f"; and {len(mismatched) - 4} more" if len(mismatched) > 4 else "")
        raise CheckpointError(
            f"{source} was saved from a different model config ({shown}); use the run's own model settings"
        )


def shapes_of(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of a model (tied weights under each name)."""
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}
