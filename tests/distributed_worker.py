"""Run by ``torchrun`` from tests/test_distributed.py: the DeepSpeed runtime's collectives on real ranks."""
from __future__ import annotations

import torch

from mpdistil_fast.distributed.deepspeed_runtime import DeepSpeedRuntime


def main() -> None:
    runtime = DeepSpeedRuntime({"teacher": {}, "student": {}}, device="cpu", batch_size=4)
    for n in (1, 2, 3, 5, 8):
        rows = runtime.rank_rows(n)
        local = torch.stack([rows * 10, rows * 10 + 1], dim=1).float()  # a result that names its row
        gathered = runtime.gather_rows(local, n)
        expected = torch.stack([torch.arange(n) * 10, torch.arange(n) * 10 + 1], dim=1).float()
        assert torch.equal(gathered, expected), (runtime.rank, n, gathered)
    assert runtime.from_main(runtime.rank + 5) == 5
    assert runtime.average({"loss": float(runtime.rank), "quiz": 1.0}) == {"loss": 0.5, "quiz": 1.0}
    runtime.barrier()
    print(f"rank {runtime.rank} of {runtime.world_size}: collectives ok")


if __name__ == "__main__":
    main()
