"""`fusion-etl bench train`: step time and peak memory of fusion training (lambda 0.9, sparse
top-k targets) against CLM-only training (lambda 1) of the same model on the same batch, each
variant in a fresh process, alternated.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from fusion_etl.bench.common import bench_kit, kit_args

__all__ = ["add_parser", "bench_train"]


def _train_worker(model_dir: str, lam: float, block: int, batch: int, k: int, steps: int) -> None:
    """One variant in its own process: median step time and peak memory over the baseline."""
    import resource

    import torch
    from transformers import AutoModelForCausalLM

    from fusion_etl.train.loss import IGNORE, fusion_loss

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = model.to(device)
    model.train()
    vocab = model.config.vocab_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, block), generator=g).to(device)
    labels = torch.cat([ids[:, 1:], torch.full((batch, 1), IGNORE, device=device)], dim=1)
    fused_ids = torch.randint(0, vocab, (batch, block, k), generator=g).to(device)
    fused_probs = torch.rand(batch, block, k, generator=g).to(device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits
        fusion_loss(logits, labels, fused_ids, fused_probs, lam).total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    # The baseline is taken before any step: peak RSS only grows, so everything a step
    # allocates (activations, logits, gradients, the loss, optimizer state) counts above it.
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()  # warm-up, not timed
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(
        "RESULT "
        + json.dumps(
            {"step_s": statistics.median(times), "peak_extra_bytes": peak, "device": device}
        ),
        flush=True,
    )


def bench_train(args: argparse.Namespace) -> int:
    kit = bench_kit(args)
    model_dir = str(kit.target.path)
    vocab = int(json.loads((kit.target.path / "config.json").read_text())["vocab_size"])
    runs: dict[str, list[dict[str, Any]]] = {"clm": [], "fusion": []}
    for _ in range(args.rounds):
        for name, lam in (("clm", 1.0), ("fusion", 0.9)):
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "fusion_etl.bench.train",
                    "_train",
                    model_dir,
                    str(lam),
                    str(args.block),
                    str(args.batch),
                    str(args.k),
                    str(args.steps),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise RuntimeError(f"train benchmark ({name}) failed:\n{proc.stderr[-3000:]}")
            runs[name].append(json.loads(line[len("RESULT ") :]))
    med = {
        n: {key: statistics.median(r[key] for r in rs) for key in ("step_s", "peak_extra_bytes")}
        for n, rs in runs.items()
    }
    device = runs["clm"][0]["device"]
    print(
        f"train benchmark on {device}: {kit.target.architecture} target, batch {args.batch} x {args.block} tokens, "
        f"vocab {vocab}, k={args.k}, {args.steps} steps x {args.rounds} rounds per variant (medians)\n"
    )
    print(f"{'variant':<22}{'step ms':>10}{'peak extra MiB':>16}")
    for n, label in (("clm", "CLM only (lambda 1)"), ("fusion", "fusion (lambda 0.9)")):
        print(
            f"{label:<22}{med[n]['step_s'] * 1000:>10.1f}{med[n]['peak_extra_bytes'] / 2**20:>16.1f}"
        )
    t_ratio = med["fusion"]["step_s"] / med["clm"]["step_s"]
    m_ratio = (med["fusion"]["peak_extra_bytes"] + 1) / (med["clm"]["peak_extra_bytes"] + 1)
    print(f"{'ratio':<22}{t_ratio:>9.2f}x{m_ratio:>15.2f}x")
    dense = args.batch * args.block * vocab * 4
    print(
        f"\n  peak memory is measured above the loaded model and batch ({'CUDA allocator' if device == 'cuda' else 'process peak RSS'}); "
        f"a dense fused target for this batch would add {dense / 2**20:.1f} MiB per teacher"
    )
    print("  goal: fusion <= 1.10x CLM-only in step time and in peak memory")
    return 0


def add_parser(sub: Any) -> None:
    tr = sub.add_parser(
        "train",
        help="fusion vs CLM-only training: step time and peak memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kit_args(tr)
    tr.add_argument("--batch", type=int, default=8, help="blocks per step (default 8)")
    tr.add_argument("--block", type=int, default=512, help="tokens per block (default 512)")
    tr.add_argument("-k", type=int, default=10, help="fused entries per position (default 10)")
    tr.add_argument("--steps", type=int, default=10, help="timed steps per run (default 10)")
    tr.add_argument(
        "--rounds", type=int, default=2, help="alternating runs per variant (default 2)"
    )
    tr.set_defaults(run=bench_train)


if __name__ == "__main__":
    if len(sys.argv) == 8 and sys.argv[1] == "_train":
        a = sys.argv
        _train_worker(a[2], float(a[3]), int(a[4]), int(a[5]), int(a[6]), int(a[7]))
