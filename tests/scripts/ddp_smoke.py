"""Two-process smoke test of the distributed path: each rank trains on its own batches, DDP must keep the weights
identical across ranks. Writes a JSON summary from the main process to argv[1]."""

import json
import os
import sys

import torch
from accelerate import Accelerator

from tests.tiny_models import tiny_model


def main(out_path: str) -> None:
    accelerator = Accelerator()
    model = tiny_model("llama")
    before = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    generator = torch.Generator().manual_seed(100 + accelerator.process_index)  # different data on each rank
    losses = []
    for _ in range(3):
        input_ids = torch.randint(3, 320, (2, 16), generator=generator)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    after = torch.cat([p.detach().flatten() for p in accelerator.unwrap_model(model).parameters()])
    checksums = accelerator.gather(torch.tensor([after.double().sum().item(), after.double().norm().item()]))
    if accelerator.is_main_process:
        summary = {
            "num_processes": accelerator.num_processes,
            "backend": str(accelerator.state.backend),
            "checksums": checksums.view(accelerator.num_processes, 2).tolist(),
            "weight_change": (after - before).norm().item(),
            "losses": losses,
        }
        with open(out_path, "w") as f:
            json.dump(summary, f)
    # Leave without tearing gloo down: a barrier (no tensors) after the gather, then os._exit. Destroying the process
    # group, or leaving it to interpreter exit, can find gloo's worker threads still releasing the gather's tensors
    # (they need the GIL): one rank aborted ("terminate called without an active exception") or deadlocked, with the
    # barrier and end_training too (1 hang in ~20 CI runs). Everything this test checks is written above.
    accelerator.wait_for_everyone()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
