"""RunPod's serverless GPU pools: the one table the endpoint advisor and the Hub files are checked against.

From RunPod's GPU pool lists (docs.runpod.io/references/gpu-types#gpu-pools and the Flash GPU types page) and
its serverless pricing page, read 2026-08. A serverless endpoint asks for pools, not cards, and a worker may
land on any card of a pool, so each pool's memory is that of its smallest card (AMPERE_24 holds the 20 GB
RTX A4500). Rows run from the cheapest per second to the dearest; recheck them when RunPod changes its pools.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuPool:
    pool_id: str  # what hub.json's gpuIds and the endpoint's GPU list take
    memory_gb: int  # the smallest card's memory, in GB as RunPod lists it
    examples: tuple[str, ...]  # RunPod GPU type ids in the pool, as tests.json's gpuTypeId takes them


POOLS = (
    GpuPool("AMPERE_16", 16, ("NVIDIA RTX A4000", "NVIDIA RTX 4000 Ada Generation", "NVIDIA RTX 2000 Ada Generation")),
    GpuPool("AMPERE_24", 20, ("NVIDIA RTX A4500", "NVIDIA RTX A5000", "NVIDIA GeForce RTX 3090")),
    GpuPool("ADA_24", 24, ("NVIDIA L4", "NVIDIA GeForce RTX 4090")),
    GpuPool("AMPERE_48", 48, ("NVIDIA A40", "NVIDIA RTX A6000")),
    GpuPool("ADA_48_PRO", 48, ("NVIDIA L40S", "NVIDIA L40", "NVIDIA RTX 6000 Ada Generation")),
    GpuPool("AMPERE_80", 80, ("NVIDIA A100 80GB PCIe", "NVIDIA A100-SXM4-80GB")),
    GpuPool("ADA_80_PRO", 80, ("NVIDIA H100 PCIe", "NVIDIA H100 80GB HBM3", "NVIDIA H100 NVL")),
    GpuPool("HOPPER_141", 141, ("NVIDIA H200",)),
)

# Share of a card's memory a worker can count on: the rest goes to the allocator's fragmentation and to
# the difference between the GB RunPod lists and what the driver reports (vLLM's default is the same 0.9).
USABLE_SHARE = 0.9


def usable_gb(pool: GpuPool) -> float:
    return pool.memory_gb * USABLE_SHARE


def pools_that_fit(need_gb: float) -> list[GpuPool]:
    """Every pool whose smallest card holds `need_gb`, cheapest first."""
    return [pool for pool in POOLS if usable_gb(pool) >= need_gb]


def pool(pool_id: str) -> GpuPool:
    for candidate in POOLS:
        if candidate.pool_id == pool_id:
            return candidate
    raise KeyError(f"unknown GPU pool {pool_id!r}; known: {', '.join(p.pool_id for p in POOLS)}")
