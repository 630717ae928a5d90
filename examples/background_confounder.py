"""Backgrounds as a confounder: contrastive learning with and without ICL-MSR on real digits.

    python examples/background_confounder.py                 # 3 seeds, a few minutes on 2 cores
    python examples/background_confounder.py --quick         # tiny smoke run, seconds
    python examples/background_confounder.py --seeds 5 --epochs 80 --gamma 0.5 --lam 0.3 \
        --num-prototypes 16 --attn-temperature 0.2 --out /tmp/bg

The benchmark is built from scikit-learn's bundled UCI handwritten digits (`load_digits`, 1797
8x8 images, no download). Each digit is pasted at a random position on a larger canvas over one
of ten procedural background textures (stripes of four orientations, two checkerboards, dots,
rings, pixel noise, blob noise). In the training set the texture index equals the class with
probability --corr (0.9), otherwise it is drawn at random, so the background is a confounder:
it predicts the label without being the digit. Test digits (a disjoint set of samples) come in
three versions: a random texture ("full"), a blank canvas ("foreground only") and, for
reference, textures drawn like the training set's ("biased").

A small CNN encoder with a projection head is trained, without labels, by

    simclr          NTXentLoss: SimCLR NT-Xent between two augmented views
    simclr+icl-msr  ICLMSRLoss: NT-Xent plus lam x the interventional (backdoor-adjusted) term
                    over learnable meta-semantic prototypes with a learnable prior
    moco            a momentum (EMA) key encoder and NTXentLoss(memory_bank_size=(Q, D))
    moco+icl-msr    the same plus lam x ICLMSRRegularizer(..., memory_bank_size=(Q, D))

for each seed, then a logistic-regression probe is fitted on frozen backbone features of the
(confounded) training images, and its accuracy is measured on the full and foreground-only test
sets: a model that leans on the background loses accuracy when the background stops matching
the class. A probe on raw pixels is reported as a baseline.

Written to --out (default examples/results/): results.md (the accuracy table, mean ± std over
seeds, the loss terms at the start and end of training, and the time per training step of each
loss backend), accuracy.png (bar chart with std error bars), samples.png (a few images of each
set) and summary.json (everything, per seed). `--backend` picks the loss kernels ("auto",
"reference" = pure PyTorch, "cpp" = fused C++); the timing section runs simclr+icl-msr with
every backend available on the CPU. `--methods` runs a subset. If the installed package lacks
the memory-bank API, the MoCo methods are skipped with a message saying why. Needs
scikit-learn and matplotlib.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import icl_msr_kernels as icl
from icl_msr_kernels import ICLMSRLoss, NTXentLoss

METHODS = ("simclr", "simclr+icl-msr", "moco", "moco+icl-msr")
TEST_SETS = ("full", "foreground", "biased")
TEST_LABELS = {
    "full": "full image, random background",
    "foreground": "foreground only",
    "biased": "full image, background as in training",
}
NUM_TEXTURES = 10
DIGIT = 8  # load_digits images are 8x8


# ----------------------------------------------------------------------------------------------
# Data: digits on textured canvases
# ----------------------------------------------------------------------------------------------

def textures(kinds: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """One (size, size) texture in [0, 1] per entry of `kinds` (0..9), with a random phase each.

    The phase (and, for the noise kinds, the pattern itself) varies per image, so a texture is a
    family of backgrounds, not one fixed picture an encoder could memorise pixel by pixel.
    """
    n = kinds.numel()
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32),
                            torch.arange(size, dtype=torch.float32), indexing="ij")
    y, x = yy.expand(n, size, size), xx.expand(n, size, size)
    phase = (torch.rand(n, 1, 1, generator=gen) * 2 * math.pi)
    phase2 = (torch.rand(n, 1, 1, generator=gen) * 2 * math.pi)
    two_pi = 2 * math.pi
    out = torch.empty(n, size, size)
    wave = {
        0: lambda: torch.sin(two_pi * y / 4 + phase),                       # horizontal stripes
        1: lambda: torch.sin(two_pi * x / 4 + phase),                       # vertical stripes
        2: lambda: torch.sin(two_pi * (x + y) / 5 + phase),                 # diagonal stripes
        3: lambda: torch.sin(two_pi * (x - y) / 5 + phase),                 # anti-diagonal stripes
        4: lambda: torch.sign(torch.sin(two_pi * x / 8 + phase)
                              * torch.sin(two_pi * y / 8 + phase2)),        # coarse checkerboard
        5: lambda: torch.sign(torch.sin(math.pi * x / 2 + phase)
                              * torch.sin(math.pi * y / 2 + phase2)),       # fine checkerboard
        6: lambda: 2 * ((torch.sin(two_pi * x / 5 + phase) > 0.6)
                        & (torch.sin(two_pi * y / 5 + phase2) > 0.6)).float() - 1,  # dots
    }
    for k in range(NUM_TEXTURES):
        idx = (kinds == k).nonzero().flatten()
        if idx.numel() == 0:
            continue
        m = idx.numel()
        if k in wave:
            t = wave[k]()[idx]
        elif k == 7:  # concentric rings around a random centre
            cy = torch.rand(m, 1, 1, generator=gen) * size
            cx = torch.rand(m, 1, 1, generator=gen) * size
            r = ((y[idx] - cy) ** 2 + (x[idx] - cx) ** 2).sqrt()
            t = torch.sin(two_pi * r / 4)
        elif k == 8:  # independent pixel noise
            t = torch.rand(m, size, size, generator=gen) * 2 - 1
        else:  # smooth blobs: upsampled coarse noise
            coarse = torch.rand(m, 1, 4, 4, generator=gen) * 2 - 1
            t = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
            t = t / t.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-6)
        out[idx] = t
    return (out.clamp(-1, 1) + 1) / 2


def compose(digits: torch.Tensor, background: torch.Tensor | None, positions: torch.Tensor,
            size: int, amplitude: float) -> torch.Tensor:
    """Paste (n, 8, 8) digits in [0, 1] at `positions` over `background` (or a blank canvas).

    The digit's intensity is its opacity: strokes cover the texture, the background shows
    through where the digit is empty.
    """
    n = digits.shape[0]
    fg = torch.zeros(n, size, size)
    rows = positions[:, 0, None, None] + torch.arange(DIGIT)[None, :, None]
    cols = positions[:, 1, None, None] + torch.arange(DIGIT)[None, None, :]
    fg[torch.arange(n)[:, None, None], rows, cols] = digits
    bg = torch.zeros_like(fg) if background is None else amplitude * background
    return (bg * (1 - fg) + fg).unsqueeze(1)  # (n, 1, size, size)


def build_benchmark(args) -> dict:
    """Train/test split by sample; confounded training set; three versions of the test set."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # say what to install rather than a bare traceback
        raise SystemExit(f"this example needs scikit-learn (pip install scikit-learn): {exc}")
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=args.test_fraction,
                                           stratify=digits.target, random_state=args.data_seed)
    if args.subset:
        train_idx, test_idx = train_idx[:args.subset], test_idx[:max(args.subset // 4, 50)]
    gen = torch.Generator().manual_seed(args.data_seed)
    size = args.canvas

    def confounded_kinds(y: torch.Tensor) -> torch.Tensor:
        random_kind = torch.randint(0, NUM_TEXTURES, y.shape, generator=gen)
        keep = torch.rand(y.shape, generator=gen) < args.corr
        return torch.where(keep, y % NUM_TEXTURES, random_kind)

    y_train = labels[train_idx]
    kinds = confounded_kinds(y_train)
    pos = torch.randint(0, size - DIGIT + 1, (len(train_idx), 2), generator=gen)
    x_train = compose(images[train_idx], textures(kinds, size, gen), pos, size, args.amplitude)
    # Every test digit appears --test-copies times (new position and texture each), which
    # averages out the luck of a single placement.
    test_rep = np.repeat(test_idx, args.test_copies)
    d_test, y_test = images[test_rep], labels[test_rep]
    pos = torch.randint(0, size - DIGIT + 1, (len(test_rep), 2), generator=gen)
    random_kinds = torch.randint(0, NUM_TEXTURES, (len(test_rep),), generator=gen)
    test = {
        "full": compose(d_test, textures(random_kinds, size, gen), pos, size, args.amplitude),
        "foreground": compose(d_test, None, pos, size, args.amplitude),
        "biased": compose(d_test, textures(confounded_kinds(y_test), size, gen), pos, size,
                          args.amplitude),
    }
    return {"x_train": x_train, "y_train": y_train, "test": test, "y_test": y_test,
            "n_train": len(train_idx), "n_test_digits": len(test_idx)}


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One random view: crop-and-resize with a shift, intensity jitter, pixel noise.

    None of these removes the background, so a texture stays a cheap cue for telling images
    apart: exactly the shortcut the confounder offers.
    """
    n = x.shape[0]
    scale = 0.75 + 0.25 * torch.rand(n, generator=gen)  # crop side as a fraction of the canvas
    room = 1 - scale + 0.25  # keep the crop mostly inside, plus a shift of up to 1/8 canvas
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * room[:, None]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    v = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    contrast = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=gen)
    brightness = 0.2 * (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1)
    return v * contrast + brightness + 0.1 * torch.randn(v.shape, generator=gen)


# ----------------------------------------------------------------------------------------------
# Model and training
# ----------------------------------------------------------------------------------------------

class Encoder(nn.Module):
    """Small CNN backbone (global-average-pooled, so translation-tolerant) + projection head."""

    def __init__(self, width: int, dim: int) -> None:
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True)]

        self.backbone = nn.Sequential(
            *block(1, width), nn.MaxPool2d(2),
            *block(width, 2 * width), nn.MaxPool2d(2),
            *block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(4 * width, 4 * width), nn.ReLU(inplace=True),
                                  nn.Linear(4 * width, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def meta_options(args) -> dict:
    return {"combine": args.combine, "prior_mode": args.prior_mode}


def make_criteria(method: str, args, backend: str) -> dict[str, nn.Module]:
    d, q = args.dim, (args.bank_size, args.dim)
    if method == "simclr":
        return {"ntxent": NTXentLoss(temperature=args.temperature, backend=backend)}
    if method == "simclr+icl-msr":
        return {"iclmsr": ICLMSRLoss(d, num_prototypes=args.num_prototypes,
                                     temperature=args.temperature,
                                     attn_temperature=args.attn_temperature, gamma=args.gamma,
                                     lam=args.lam, learnable_prior=True, backend=backend,
                                     **meta_options(args))}
    moco = {"moco": NTXentLoss(temperature=args.temperature, memory_bank_size=q, backend=backend)}
    if method == "moco+icl-msr":
        moco["reg"] = icl.ICLMSRRegularizer(d, num_prototypes=args.num_prototypes,
                                            temperature=args.temperature,
                                            attn_temperature=args.attn_temperature,
                                            gamma=args.gamma, learnable_prior=True,
                                            backend=backend, memory_bank_size=q,
                                            **meta_options(args))
    return moco


def moco_unavailable(args) -> str | None:
    """Why the memory-bank API cannot run here, or None: a tiny trial of both MoCo losses."""
    try:
        crit = make_criteria("moco+icl-msr", args, args.backend)
        q = torch.randn(4, args.dim, requires_grad=True)
        k = torch.randn(4, args.dim)
        (crit["moco"](q, k) + crit["reg"](q, k)).backward()
    except Exception as exc:  # noqa: BLE001 - any failure of the API means: skip, and say why
        return f"{type(exc).__name__}: {exc}"
    return None


def train_one(method: str, data: dict, args, seed: int, backend: str,
              steps: int | None = None) -> dict:
    """Self-supervised training of one encoder; returns it with every loss term per step."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(10_000 + seed)
    model = Encoder(args.width, args.dim)
    criteria = make_criteria(method, args, backend)
    params = list(model.parameters())
    for crit in criteria.values():  # the prototypes and prior are trained with the encoder
        params += list(crit.parameters())
    optimizer = torch.optim.Adam(params, lr=args.lr)
    key_model = None
    if method.startswith("moco"):
        key_model = copy.deepcopy(model)
        for p in key_model.parameters():
            p.requires_grad_(False)

    x_train = data["x_train"]
    n, batch = x_train.shape[0], min(args.batch_size, x_train.shape[0])
    per_epoch = n // batch
    total_steps = steps if steps is not None else max(1, args.epochs * per_epoch)
    history: dict[str, list[float]] = {}
    step_times = []
    step = 0
    while step < total_steps:
        order = torch.randperm(n, generator=gen)
        for b in range(per_epoch):
            if step >= total_steps:
                break
            t0 = time.perf_counter()
            x = x_train[order[b * batch:(b + 1) * batch]]
            v1, v2 = augment(x, gen), augment(x, gen)
            if key_model is None:
                z = model(torch.cat([v1, v2]))  # one pass: both views share BatchNorm statistics
                z1, z2 = z[:batch], z[batch:]
                if method == "simclr":
                    loss = criteria["ntxent"](z1, z2)
                    terms = {"ntxent": loss}
                else:
                    loss, base, inter = criteria["iclmsr"](z1, z2, return_parts=True)
                    terms = {"total": loss, "base": base, "interventional": inter}
            else:
                q = model(v1)
                with torch.no_grad():
                    k = key_model(v2)
                moco = criteria["moco"](q, k)  # enqueues k after computing the loss
                terms = {"moco": moco}
                loss = moco
                if "reg" in criteria:
                    inter = criteria["reg"](q, k)
                    loss = moco + args.lam * inter
                    terms = {"total": loss, "moco": moco, "interventional": inter}
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if key_model is not None:  # EMA of the query encoder
                with torch.no_grad():
                    for pk, pq in zip(key_model.parameters(), model.parameters()):
                        pk.mul_(args.momentum).add_(pq.detach(), alpha=1 - args.momentum)
            step_times.append(time.perf_counter() - t0)
            for name, value in terms.items():
                history.setdefault(name, []).append(float(value.detach()))
            step += 1
    # Until the bank has been filled once, its negatives include random unit rows, which are
    # easy; the MoCo "start" window therefore begins once it holds only real keys.
    warmup = math.ceil(args.bank_size / batch) if key_model is not None else 0
    return {"model": model, "history": history, "step_times": step_times, "warmup": warmup,
            "steps": total_steps}


def loss_windows(history: dict[str, list[float]], warmup: int, window: int) -> dict:
    out = {}
    for name, values in history.items():
        start = values[min(warmup, max(0, len(values) - 2 * window)):][:window]
        end = values[-window:]
        out[name] = {"start": sum(start) / len(start), "end": sum(end) / len(end)}
    return out


@torch.no_grad()
def features(model: Encoder, x: torch.Tensor) -> np.ndarray:
    model.eval()
    return torch.cat([model.backbone(chunk) for chunk in x.split(1024)]).numpy()


def probe(train_x: np.ndarray, train_y: np.ndarray, tests: dict[str, np.ndarray],
          test_y: np.ndarray) -> dict[str, float]:
    """Logistic regression on standardised frozen features; accuracy on each test set."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    clf.fit(train_x, train_y)
    return {name: float((clf.predict(x) == test_y).mean()) for name, x in tests.items()}


# ----------------------------------------------------------------------------------------------
# Backend timing
# ----------------------------------------------------------------------------------------------

def time_backends(data: dict, args) -> dict:
    """ms per training step of simclr+icl-msr, and of the loss alone (forward+backward), per backend."""
    results = {}
    n = min(args.batch_size, data["x_train"].shape[0])
    for backend in icl.available_backends():
        if backend in ("triton", "cuda"):  # GPU backends; triton runs on the CPU only interpreted
            continue
        run = train_one("simclr+icl-msr", data, args, seed=0, backend=backend,
                        steps=args.timing_steps + 2)
        step_ms = 1000 * statistics.median(run["step_times"][2:])  # first steps warm up
        crit = ICLMSRLoss(args.dim, num_prototypes=args.num_prototypes,
                          temperature=args.temperature, attn_temperature=args.attn_temperature,
                          gamma=args.gamma, lam=args.lam, learnable_prior=True, backend=backend,
                          **meta_options(args))
        gen = torch.Generator().manual_seed(0)
        z1 = torch.randn(n, args.dim, generator=gen, requires_grad=True)
        z2 = torch.randn(n, args.dim, generator=gen, requires_grad=True)
        times = []
        for i in range(args.timing_steps + 2):
            t0 = time.perf_counter()
            crit(z1, z2).backward()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        results[backend] = {"step_ms": step_ms, "loss_fwd_bwd_ms": 1000 * statistics.median(times)}
    return results


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------

def mean_std(values: list[float]) -> tuple[float, float]:
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def write_report(summary: dict, out: Path) -> str:
    acc = summary["accuracy"]
    lines = [
        f"Linear-probe accuracy (%), mean ± std over {summary['config']['seeds']} seed(s); "
        f"probe fitted on the confounded training set (background = class with p = "
        f"{summary['config']['corr']}).",
        "",
        "| method | " + " | ".join(TEST_LABELS[t] for t in TEST_SETS) + " |",
        "|---|" + "---:|" * len(TEST_SETS),
    ]
    for method, per_test in acc.items():
        cells = []
        for t in TEST_SETS:
            m, s = mean_std(per_test[t])
            cells.append(f"{100 * m:.1f} ± {100 * s:.1f}" if len(per_test[t]) > 1
                         else f"{100 * m:.1f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if summary.get("moco_skipped"):
        lines += ["", f"MoCo methods skipped: {summary['moco_skipped']}"]
    lines += ["", "Loss terms, mean over the first and last steps of training (seed mean):", "",
              "| method | term | start | end |", "|---|---|---:|---:|"]
    for method, terms in summary["losses"].items():
        for name in terms[0]:
            start = statistics.fmean(t[name]["start"] for t in terms)
            end = statistics.fmean(t[name]["end"] for t in terms)
            lines.append(f"| {method} | {name} | {start:.4f} | {end:.4f} |")
    lines += ["", f"Time per training step of simclr+icl-msr (batch {summary['config']['batch_size']}, "
              f"{torch.get_num_threads()} threads), and of the loss alone:", "",
              "| backend | training step (ms) | loss forward+backward (ms) |", "|---|---:|---:|"]
    for backend, t in summary["backend_timing"].items():
        lines.append(f"| {backend} | {t['step_ms']:.1f} | {t['loss_fwd_bwd_ms']:.2f} |")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    return text


def plot(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = summary["accuracy"]
    methods = list(acc)
    width = 0.8 / len(TEST_SETS)
    fig, ax = plt.subplots(figsize=(1.6 * len(methods) + 2, 4))
    for i, t in enumerate(TEST_SETS):
        stats = [mean_std(acc[m][t]) for m in methods]
        ax.bar([j + (i - (len(TEST_SETS) - 1) / 2) * width for j in range(len(methods))],
               [100 * m for m, _ in stats], width, yerr=[100 * s for _, s in stats], capsize=3,
               label=TEST_LABELS[t])
    ax.set_xticks(range(len(methods)), methods, rotation=15)
    ax.set_ylabel("linear-probe accuracy (%)")
    ax.set_ylim(0, 118)  # headroom for the legend above the bars
    ax.set_yticks(range(0, 101, 20))
    ax.set_title("Digits over confounding backgrounds")
    ax.legend(fontsize=8, loc="upper left", ncol=len(TEST_SETS))
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)


def plot_samples(data: dict, out: Path, per_row: int = 10) -> None:
    """A few training images and the same test digits in their two test versions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("train", data["x_train"]), ("test: full", data["test"]["full"]),
            ("test: foreground", data["test"]["foreground"])]
    fig, axes = plt.subplots(len(rows), per_row, figsize=(per_row * 0.9, len(rows) * 1.0))
    for r, (name, x) in enumerate(rows):
        step = max(1, x.shape[0] // per_row)  # spread over the set: test copies sit together
        for c in range(per_row):
            ax = axes[r, c]
            ax.imshow(x[min(c * step, x.shape[0] - 1), 0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(name, fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "samples.png", dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke run: 1 seed, few steps, subset")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--backend", default="auto", help="loss kernels: auto, reference, cpp, ...")
    p.add_argument("--methods", default=",".join(METHODS))
    # ICL-MSR
    p.add_argument("--gamma", type=float, default=1.0, help="weight of the adjusted term (γ)")
    p.add_argument("--lam", type=float, default=1.0, help="regulariser weight (λ)")
    p.add_argument("--num-prototypes", type=int, default=16, help="meta semantics (K)")
    p.add_argument("--attn-temperature", type=float, default=0.1, help="attention temperature (τ_a)")
    p.add_argument("--temperature", type=float, default=0.2, help="contrastive temperature (τ)")
    p.add_argument("--combine", default="concat", choices=("concat", "add"))
    p.add_argument("--prior-mode", default="logit", choices=("logit", "mult"))
    # MoCo
    p.add_argument("--bank-size", type=int, default=512, help="memory bank rows (Q)")
    p.add_argument("--momentum", type=float, default=0.99, help="EMA of the key encoder")
    # training and data
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--width", type=int, default=16, help="channels of the first conv layer")
    p.add_argument("--dim", type=int, default=64, help="projection (embedding) size D")
    p.add_argument("--canvas", type=int, default=16, help="canvas side in pixels (digit: 8)")
    p.add_argument("--amplitude", type=float, default=0.3, help="background intensity")
    p.add_argument("--corr", type=float, default=0.9, help="P(texture = class) in training")
    p.add_argument("--test-fraction", type=float, default=0.25)
    p.add_argument("--test-copies", type=int, default=3)
    p.add_argument("--subset", type=int, default=0, help="use only this many training digits")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--timing-steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.subset, args.batch_size, args.test_copies = 1, 384, 64, 1
        args.bank_size, args.timing_steps = 128, 2
        args.quick_steps = 24
    else:
        args.quick_steps = None
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    data = build_benchmark(args)
    print(f"train: {data['n_train']} digits on {args.canvas}x{args.canvas} canvases "
          f"(background = class with p = {args.corr}); test: {data['n_test_digits']} digits "
          f"x {args.test_copies} placements; threads: {torch.get_num_threads()}", flush=True)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown --methods {sorted(unknown)}; choose from {list(METHODS)}")
    moco_skipped = None
    if any(m.startswith("moco") for m in methods):
        moco_skipped = moco_unavailable(args)
        if moco_skipped:
            print(f"MoCo methods skipped: {moco_skipped}", flush=True)
            methods = [m for m in methods if not m.startswith("moco")]

    y_train, y_test = data["y_train"].numpy(), data["y_test"].numpy()
    flat = {t: x.flatten(1).numpy() for t, x in data["test"].items()}
    accuracy = {"pixels (no training)": {
        t: [a] for t, a in probe(data["x_train"].flatten(1).numpy(), y_train, flat, y_test).items()}}
    losses: dict[str, list] = {}
    for method in methods:
        accuracy[method] = {t: [] for t in TEST_SETS}
        losses[method] = []
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            run = train_one(method, data, args, seed, args.backend, steps=args.quick_steps)
            window = max(1, min(10, (run["steps"] - run["warmup"]) // 4))
            windows = loss_windows(run["history"], run["warmup"], window)
            losses[method].append(windows)
            feats = {t: features(run["model"], x) for t, x in data["test"].items()}
            acc = probe(features(run["model"], data["x_train"]), y_train, feats, y_test)
            for t in TEST_SETS:
                accuracy[method][t].append(acc[t])
            terms = ", ".join(f"{k} {v['start']:.3f} -> {v['end']:.3f}" for k, v in windows.items())
            print(f"{method:15s} seed {seed}: {run['steps']} steps in {time.perf_counter() - t0:5.1f} s"
                  f" | full {100 * acc['full']:.1f}%  foreground {100 * acc['foreground']:.1f}%"
                  f"  biased {100 * acc['biased']:.1f}% | {terms}", flush=True)

    backend_timing = time_backends(data, args)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    summary = {"config": config, "methods": methods, "moco_skipped": moco_skipped,
               "accuracy": accuracy, "losses": losses, "backend_timing": backend_timing,
               "n_train": data["n_train"], "n_test_digits": data["n_test_digits"],
               "torch_threads": torch.get_num_threads()}
    report = write_report(summary, args.out)
    plot(summary, args.out)
    plot_samples(data, args.out)
    summary["wall_s"] = time.perf_counter() - t_start
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print()
    print(report)
    print(f"wrote results.md, accuracy.png, samples.png and summary.json to {args.out} "
          f"in {summary['wall_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
