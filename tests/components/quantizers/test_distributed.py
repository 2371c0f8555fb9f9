"""Two processes on gloo, each fed different data: EMA codebooks (k-means init, EMA, dead-code
restart) must stay identical across replicas, as DDP needs, and equal to the codebook one
process trains on both replicas' data (worker counts are speed knobs, not outcomes)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from components.quantizers import QUANTIZERS

CONFIGS = [
    {"type": "vq", "codebook_size": 32, "restart_after_steps": 2, "kmeans_init_batches": 2},
    {"type": "residual", "codebook_size": 16, "stages": 2, "shared_codebook": True, "restart_after_steps": 2},
    {"type": "product", "codebook_size": 16, "groups": 2, "restart_after_steps": 2},
    # More rare codes than rows: which codes are re-seeded is rank 0's choice too.
    {"type": "vq", "codebook_size": 64, "dead_code_threshold": 1.0, "restart_after_steps": 0},
]


def _batch(data: torch.Generator, rank: int) -> torch.Tensor:
    # Rank 1 sees a shifted, narrower distribution: codes die on one replica only.
    return torch.randn(2, 16, 4, generator=data) * (1 + rank) + 3 * rank


def _replica(rank: int, world: int, rendezvous: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    try:
        for i, raw in enumerate(CONFIGS):
            torch.manual_seed(0)  # same initial weights, as DDP replicas have
            q = QUANTIZERS[raw["type"]].model_validate(raw).build(4).train()
            data = torch.Generator().manual_seed(100 + rank)  # but different data
            for _ in range(8):
                q(_batch(data, rank))
            torch.save({k: v for k, v in q.state_dict().items()}, f"{out_dir}/q{i}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_ema_codebooks_stay_identical_across_replicas(tmp_path):
    mp.spawn(_replica, args=(2, f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=2, join=True)
    for i, raw in enumerate(CONFIGS):
        a = torch.load(tmp_path / f"q{i}-rank0.pt", weights_only=True)
        b = torch.load(tmp_path / f"q{i}-rank1.pt", weights_only=True)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{raw['type']}: {key} differs between replicas"
        # The replicas did learn: the state is not the untouched initial one.
        torch.manual_seed(0)
        initial = QUANTIZERS[raw["type"]].model_validate(raw).build(4).state_dict()
        assert any(not torch.equal(a[k], initial[k]) for k in a if a[k].is_floating_point())
        # One process fed both replicas' batches, in rank order, trains the same codebook.
        torch.manual_seed(0)
        q = QUANTIZERS[raw["type"]].model_validate(raw).build(4).train()
        data = [torch.Generator().manual_seed(100 + rank) for rank in (0, 1)]
        for _ in range(8):
            q(torch.cat([_batch(data[rank], rank) for rank in (0, 1)]))
        for key, value in q.state_dict().items():
            assert torch.allclose(value.float(), a[key].float(), atol=1e-5), f"{raw['type']}: {key} differs from one's"
