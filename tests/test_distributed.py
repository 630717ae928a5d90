"""Distributed negatives (docs/math.md §6) with real gloo processes on loopback."""

import importlib.util
import os
import socket
import subprocess
import sys

import pytest
import torch

import icl_msr_kernels as icl
from dist_worker import CONFIGS, PER_RANK, global_batch, loss_and_grads

WORKER = os.path.join(os.path.dirname(__file__), "dist_worker.py")
TIMEOUT_S = 180
CPU_BACKENDS = [b for b in ("reference", "cpp") if b in icl.available_backends()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, case: str, tmp_path, backends=CPU_BACKENDS, extra_env=None):
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **(extra_env or {}))
    procs = [subprocess.Popen([sys.executable, WORKER, str(r), str(world), str(port),
                               str(tmp_path), case, ",".join(backends)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(world)]
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=TIMEOUT_S)
            assert proc.returncode == 0, out.decode()[-3000:]
    finally:
        for proc in procs:
            proc.kill()
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_reproduce_single_process_training(world, tmp_path):
    ranks = run_ranks(world, "match", tmp_path)
    batch = global_batch(world)
    for backend in CPU_BACKENDS:
        for config in CONFIGS:
            want_loss, want = loss_and_grads(batch, config, "reference", False)
            results = [r[(backend, config)] for r in ranks]
            where = f"{backend} {config} world={world}"
            mean_loss = torch.stack([loss for loss, _ in results]).mean()
            torch.testing.assert_close(mean_loss, want_loss, rtol=1e-10, atol=0, msg=where)
            for rank, (_, grads) in enumerate(results):
                rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
                for view in ("z1", "z2"):  # docs/math.md §6: W times the global-batch gradient
                    torch.testing.assert_close(grads[view], world * want[view][rows], rtol=1e-9,
                                               atol=1e-12, msg=f"{where} {view} rank {rank}")
            for name in want:  # parameters: DDP's average over ranks
                if name in ("z1", "z2"):
                    continue
                averaged = torch.stack([grads[name] for _, grads in results]).mean(0)
                torch.testing.assert_close(averaged, want[name], rtol=1e-9, atol=1e-12,
                                           msg=f"{where} {name}")


@pytest.mark.parametrize("world", [2, 3])
def test_split_sweep_equals_the_gathered_reference(world, tmp_path):
    """The fused backends divide the job's tile pairs among the ranks; the reference gathers
    every rank's rows. Same losses and gradients on every rank, for unequal upstream gradients,
    N = 1, 3 and 300 per rank (no multiple of a tile)."""
    from dist_worker import SPLIT_SIZES

    fused = [b for b in CPU_BACKENDS if b != "reference"]
    _assert_split_matches(run_ranks(world, "split", tmp_path), world, SPLIT_SIZES, fused)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_split_sweep_under_the_triton_interpreter(tmp_path):
    """The Triton pair kernels (interpreted on the CPU) in the same split sweep."""
    sizes = (1, 3, 20)
    ranks = run_ranks(2, "split:" + ",".join(map(str, sizes)), tmp_path,
                      backends=["reference", "triton"], extra_env={"TRITON_INTERPRET": "1"})
    _assert_split_matches(ranks, 2, sizes, ["triton"])


def _assert_split_matches(ranks, world, sizes, backends):
    for rank, results in enumerate(ranks):
        calls = results["split calls"]
        assert calls["reference"] == 0, calls  # the truth keeps the plain gather
        for backend in backends:  # one split sweep per loss call: the fused path really ran
            assert calls[backend] == len(sizes) * len(CONFIGS), calls
        for n in sizes:
            for config in CONFIGS:
                want_parts, want = results[(n, "reference", config)]
                for backend in backends:
                    parts, grads = results[(n, backend, config)]
                    where = f"{backend} {config} N={n} world={world} rank {rank}"
                    for p, w in zip(parts, want_parts):
                        torch.testing.assert_close(p, w, rtol=1e-10, atol=1e-12, msg=where)
                    for name in want:
                        torch.testing.assert_close(grads[name], want[name], rtol=1e-9,
                                                   atol=1e-12, msg=f"{where} {name}")


def test_mismatched_batch_shapes_raise_on_every_rank(tmp_path):
    messages = run_ranks(2, "mismatch", tmp_path, backends=["reference"])
    for message in messages:
        assert "same batch shape" in message and "rank 1: 8 rows" in message


def test_mismatched_dtypes_raise_on_every_rank(tmp_path):
    # float16 and bfloat16 have one element size: the check must compare the dtypes themselves.
    for message in run_ranks(2, "dtype-mismatch", tmp_path, backends=["reference"]):
        assert "same batch shape and dtype" in message and "bfloat16" in message, message


def test_shape_check_runs_once_per_shape(tmp_path):
    # First step: the check's gather plus the two feature gathers (a and b); then only those.
    for counts in run_ranks(2, "collectives", tmp_path, backends=["reference"]):
        assert counts == [3, 2, 2], counts


def test_gather_without_process_group_is_the_local_loss():
    # lightly's and OpenCLIP's convention: the same script runs on one device and on many.
    gen = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    prototypes = torch.randn(2, 4, generator=gen)
    for backend in CPU_BACKENDS:
        for fn, args in ((icl.ntxent_loss, (z1, z2)),
                         (icl.icl_msr_loss, (z1, z2, prototypes)),
                         (icl.icl_msr_regularizer, (z1, z2, prototypes))):
            assert torch.equal(fn(*args, gather_distributed=True, backend=backend),
                               fn(*args, backend=backend))
        for module in (icl.NTXentLoss(backend=backend),
                       icl.ICLMSRLoss(4, 2, backend=backend),
                       icl.ICLMSRRegularizer(4, 2, backend=backend)):
            gathered = type(module)(**_same_settings(module), gather_distributed=True)
            gathered.load_state_dict(module.state_dict())
            assert torch.equal(gathered(z1, z2), module(z1, z2))


def _same_settings(module):
    if isinstance(module, icl.NTXentLoss):
        return dict(temperature=module.temperature, backend=module.backend)
    dim, k = module.prototypes.shape[1], module.prototypes.shape[0]
    return dict(dim=dim, num_prototypes=k, backend=module.backend)


def test_ddp_example_trains_under_torchrun():
    root = os.path.dirname(os.path.dirname(__file__))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_port", str(_free_port()), os.path.join(root, "examples", "ddp_icl_msr.py"),
         "--steps", "12"],
        capture_output=True, text=True, timeout=TIMEOUT_S,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(line.split()[3]) for line in proc.stdout.splitlines() if line.startswith("step")]
    assert len(losses) == 3 and losses[-1] < losses[0]
