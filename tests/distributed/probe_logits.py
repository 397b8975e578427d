"""Under torchrun: load a run's newest checkpoint with its own strategy and save logits of a fixed batch.

    torchrun --standalone --nproc-per-node 2 tests/distributed/probe_logits.py ROOT RUN_ID OUT.pt

This is "the trained model" that an export must reproduce: the weights as the training strategy holds
them (sharded for FSDP2/ZeRO-3), evaluated by every rank together.
"""

from __future__ import annotations

import sys

import torch

from orchestrator.launch.torchrun import TorchrunContext
from orchestrator.run.lifecycle import reopen_run
from trainers.distributed import ensure_process_group
from trainers.loop import Trainer


def main(root: str, run_id: str, out: str) -> None:
    ensure_process_group("gloo")
    ctx = TorchrunContext()
    _, _, cfg = reopen_run(root, run_id, [f"cluster.num_workers={ctx.world_size}"])
    trainer = Trainer(cfg, ctx)
    assert trainer.restore() is not None, "no checkpoint to probe"
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, trainer.data.vocab_size, (2, cfg.data.seq_len), generator=generator)
    trainer.model.eval()
    with torch.no_grad():
        logits = trainer.model(input_ids=batch).logits
    if ctx.rank == 0:
        torch.save({"input_ids": batch, "logits": logits.float().cpu(), "step": trainer.step}, out)
    # Leave together and tear the group down: a rank exiting while its peer still works can abort in
    # gloo's C++ threads ("terminate called without an active exception").
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
