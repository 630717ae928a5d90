"""One rank of the distributed tests (launched by test_distributed.py, not collected by pytest).

usage: dist_worker.py RANK WORLD PORT OUT_DIR CASE BACKENDS
CASE "match": per-rank slices of a fixed global batch; saves losses and gradients per config.
CASE "mismatch": ranks with different batch sizes; saves the error message.
CASE "split": per-rank batches of several sizes, losses weighted differently on each rank, for
every backend (the fused ones split the job's tile pairs; the reference gathers).
CASE "dtype-mismatch": float16 on rank 0, bfloat16 on rank 1; saves the error message.
CASE "collectives": counts all_gather calls over three steps of one shape.
CASE "lightly": our NTXentLoss and lightly's on the same rank-local views, without and with a
memory bank (gather_distributed=True); saves both losses, gradients and banks.
"""

import sys

import torch
import torch.distributed as dist

from icl_msr_kernels import icl_msr_loss, ntxent_loss

PER_RANK = 3
CONFIGS = [("logit", "concat"), ("logit", "add"), ("mult", "concat"), ("mult", "add"),
           ("ntxent", None)]


def global_batch(world: int):
    """The same float64 global batch on every rank (and in the single-process check)."""
    gen = torch.Generator().manual_seed(11)
    n, d, k = PER_RANK * world, 5, 4
    return {
        "z1": torch.randn(n, d, generator=gen, dtype=torch.float64),
        "z2": torch.randn(n, d, generator=gen, dtype=torch.float64),
        "prototypes": torch.randn(k, d, generator=gen, dtype=torch.float64),
        "prior_logits": torch.randn(k, generator=gen, dtype=torch.float64),
        "temperature": torch.tensor(0.3, dtype=torch.float64),
    }


def loss_and_grads(batch, config, backend, gather):
    leaves = {name: t.detach().clone().requires_grad_(True) for name, t in batch.items()}
    prior_mode, combine = config
    if prior_mode == "ntxent":
        loss = ntxent_loss(leaves["z1"], leaves["z2"], temperature=leaves["temperature"],
                           backend=backend, gather_distributed=gather)
        leaves = {n: leaves[n] for n in ("z1", "z2", "temperature")}
    else:
        loss = icl_msr_loss(leaves["z1"], leaves["z2"], leaves["prototypes"],
                            leaves["prior_logits"], temperature=leaves["temperature"],
                            attn_temperature=0.4, gamma=0.8, lam=0.6, prior_mode=prior_mode,
                            combine=combine, backend=backend, gather_distributed=gather)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return loss.detach(), dict(zip(leaves, grads))


SPLIT_SIZES = (1, 3, 300)  # per-rank N; 300 makes 2N W rows no multiple of any tile


def split_case(rank: int, world: int, backends: list[str], sizes=SPLIT_SIZES):
    from icl_msr_kernels import distributed

    results = {"split calls": {backend: 0 for backend in backends}}
    real_apply = distributed.SplitContrastive.apply
    current = {}

    def counting_apply(*args):
        results["split calls"][current["backend"]] += 1
        return real_apply(*args)

    distributed.SplitContrastive.apply = counting_apply
    for n in sizes:
        gen = torch.Generator().manual_seed(100 + n)
        d, k = 7, 5
        batch = {"z1": torch.randn(n * world, d, generator=gen, dtype=torch.float64),
                 "z2": torch.randn(n * world, d, generator=gen, dtype=torch.float64),
                 "prototypes": torch.randn(k, d, generator=gen, dtype=torch.float64),
                 "prior_logits": torch.randn(k, generator=gen, dtype=torch.float64),
                 "temperature": torch.tensor(0.3, dtype=torch.float64)}
        rows = slice(rank * n, (rank + 1) * n)
        for backend in backends:
            current["backend"] = backend
            for config in CONFIGS:
                leaves = {name: (t[rows] if name in ("z1", "z2") else t).detach().clone()
                          .requires_grad_(True) for name, t in batch.items()}
                prior_mode, combine = config
                if prior_mode == "ntxent":
                    parts = (ntxent_loss(leaves["z1"], leaves["z2"],
                                         temperature=leaves["temperature"], backend=backend,
                                         gather_distributed=True),)
                    leaves = {m: leaves[m] for m in ("z1", "z2", "temperature")}
                else:
                    parts = icl_msr_loss(leaves["z1"], leaves["z2"], leaves["prototypes"],
                                         leaves["prior_logits"], temperature=leaves["temperature"],
                                         attn_temperature=0.4, gamma=0.8, prior_mode=prior_mode,
                                         combine=combine, backend=backend,
                                         gather_distributed=True, return_parts=True)[1:]
                # Unequal upstream gradients: each rank weighs its terms differently.
                total = sum((1.0 + rank + 0.5 * t) * part for t, part in enumerate(parts))
                grads = torch.autograd.grad(total, list(leaves.values()))
                results[(n, backend, config)] = ([p.detach() for p in parts],
                                                 dict(zip(leaves, grads)))
    return results


def check_case(rank: int, case: str):
    if case == "dtype-mismatch":
        z = torch.randn(PER_RANK, 4).to(torch.float16 if rank == 0 else torch.bfloat16)
        try:
            ntxent_loss(z, z.flip(0), gather_distributed=True, backend="reference")
            return "no error"
        except ValueError as err:
            return str(err)
    calls = []
    real = dist.all_gather

    def counting(*args, **kwargs):
        calls.append(args[1].shape)
        return real(*args, **kwargs)

    dist.all_gather = counting
    try:
        counts = []
        for _ in range(3):
            before = len(calls)
            z = torch.randn(PER_RANK, 4, requires_grad=True)
            icl_msr_loss(z, z.flip(0), torch.randn(2, 4), gather_distributed=True,
                         backend="reference").backward()
            counts.append(len(calls) - before)
        return counts
    finally:
        dist.all_gather = real


def lightly_case(rank: int, backends: list[str]):
    from lightly.loss import NTXentLoss as LightlyNTXent

    from icl_msr_kernels import NTXentLoss

    results = {}
    gen = torch.Generator().manual_seed(20 + rank)
    # float32: lightly's bank is float32 and its einsum refuses float64 embeddings.
    out0 = torch.randn(PER_RANK, 5, generator=gen)
    out1 = torch.randn(PER_RANK, 5, generator=gen)
    for backend in backends:
        for with_bank in (False, True):
            size = (8, 5) if with_bank else 0
            theirs = LightlyNTXent(0.3, memory_bank_size=size, gather_distributed=True)
            ours = NTXentLoss(0.3, memory_bank_size=size, gather_distributed=True,
                              backend=backend)
            if with_bank:
                ours.memory_bank.bank.copy_(theirs.memory_bank.bank)
            pair = []
            for fn in (ours, theirs):
                leaves = [out0.clone().requires_grad_(), out1.clone().requires_grad_()]
                loss = fn(*leaves)
                grads = torch.autograd.grad(loss, leaves)
                bank = fn.memory_bank.bank.clone() if with_bank else None
                pair.append((loss.detach(), grads, bank))
            results[(backend, with_bank)] = tuple(pair)
    return results


def main(rank: int, world: int, port: int, out_dir: str, case: str, backends: list[str]) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        if case.startswith("split"):  # "split" or "split:N1,N2,..."
            sizes = tuple(map(int, case.split(":")[1].split(","))) if ":" in case else SPLIT_SIZES
            torch.save(split_case(rank, world, backends, sizes), f"{out_dir}/rank{rank}.pt")
        elif case in ("dtype-mismatch", "collectives"):
            torch.save(check_case(rank, case), f"{out_dir}/rank{rank}.pt")
        elif case == "lightly":
            torch.save(lightly_case(rank, backends), f"{out_dir}/rank{rank}.pt")
        elif case == "mismatch":
            z = torch.randn(PER_RANK + rank, 4)
            try:
                ntxent_loss(z, z.flip(0), gather_distributed=True)
                message = "no error"
            except ValueError as err:
                message = str(err)
            torch.save(message, f"{out_dir}/rank{rank}.pt")
        else:
            batch = global_batch(world)
            rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            mine = dict(batch, z1=batch["z1"][rows], z2=batch["z2"][rows])
            results = {(backend, config): loss_and_grads(mine, config, backend, True)
                       for backend in backends for config in CONFIGS}
            torch.save(results, f"{out_dir}/rank{rank}.pt")
        # Every rank done before any tears down: a gloo peer that closes its connections while
        # another still reads them makes the reader abort at exit.
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    rank, world, port, out_dir, case, backends = sys.argv[1:]
    main(int(rank), int(world), int(port), out_dir, case, backends.split(","))
