"""A small DDP training loop with ICL-MSR and distributed negatives, on the CPU.

    torchrun --nproc_per_node=2 examples/ddp_icl_msr.py [--steps 30]

Synthetic data: points from a few Gaussian clusters in 32-D; the two "views" are the same point
with independent noise and random feature dropout. A small MLP encoder learns embeddings;
ICLMSRLoss owns learnable prototypes and prior. Each rank sees its own share of every batch;
gather_distributed=True makes all ranks' samples negatives for every anchor.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from icl_msr_kernels import ICLMSRLoss


class SelfSupervised(nn.Module):
    """Encoder + loss in one module, so DDP also averages the prototypes' gradients."""

    def __init__(self, in_dim: int = 32, dim: int = 16, num_prototypes: int = 8,
                 backend: str = "auto") -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(in_dim, 64), nn.ReLU(), nn.Linear(64, dim))
        self.criterion = ICLMSRLoss(dim, num_prototypes, temperature=0.2, learnable_prior=True,
                                    gather_distributed=True, backend=backend)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        return self.criterion(self.encoder(view1), self.encoder(view2))


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    keep = (torch.rand(x.shape, generator=gen) > 0.2).float()
    return x * keep + 0.3 * torch.randn(x.shape, generator=gen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-per-rank", type=int, default=64)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts them)
    model = DistributedDataParallel(SelfSupervised(backend=args.backend))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    centers = torch.randn(10, 32, generator=torch.Generator().manual_seed(1)) * 2
    gen = torch.Generator().manual_seed(100 + rank)  # each rank draws its own samples

    for step in range(args.steps):
        points = centers[torch.randint(0, 10, (args.batch_per_rank,), generator=gen)]
        points = points + 0.5 * torch.randn(points.shape, generator=gen)
        loss = model(augment(points, gen), augment(points, gen))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {mean_loss.item() / world:.4f}  "
                  f"(global batch {args.batch_per_rank * world})", flush=True)
    # Every rank done before any tears down: a gloo peer closing its connections while another
    # still reads them makes the reader abort at exit.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
