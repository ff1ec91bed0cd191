"""`fusion-etl bench train`: step time and peak memory of fusion training (lambda 0.9, sparse
top-k targets) against CLM-only training (lambda 1) of the same model on the same batch, each
variant in a fresh process, alternated; then FSDP2 against DDP at two workers (gloo on CPU,
NCCL on GPUs): step time, per-worker peak memory, and the parameter, gradient and optimizer
bytes each worker holds, next to what the memory plan predicts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from fusion_etl.bench.common import bench_kit, kit_args

__all__ = ["add_parser", "bench_train"]


def _train_worker(
    model_dir: str, lam: float, block: int, batch: int, k: int, steps: int, topk_mass: str
) -> None:
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
        fusion_loss(
            logits, labels, fused_ids, fused_probs, lam, topk_mass=topk_mass
        ).total.backward()
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
    variants = {
        "clm": ("CLM only (lambda 1)", 1.0, "renormalize"),
        "fusion": ("fusion (lambda 0.9)", 0.9, "renormalize"),
        "rest": ("fusion, rest bucket", 0.9, "rest"),
    }
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in variants}
    for _ in range(args.rounds):
        for name, (_, lam, mass) in variants.items():
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
                    mass,
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
    print(f"{'variant':<22}{'step ms':>10}{'peak extra MiB':>16}{'vs CLM only':>22}")
    for n, (label, _, _) in variants.items():
        t_ratio = med[n]["step_s"] / med["clm"]["step_s"]
        m_ratio = (med[n]["peak_extra_bytes"] + 1) / (med["clm"]["peak_extra_bytes"] + 1)
        print(
            f"{label:<22}{med[n]['step_s'] * 1000:>10.1f}{med[n]['peak_extra_bytes'] / 2**20:>16.1f}"
            + (f"{t_ratio:>11.2f}x{m_ratio:>10.2f}x" if n != "clm" else "")
        )
    dense = args.batch * args.block * vocab * 4
    print(
        f"\n  peak memory is measured above the loaded model and batch ({'CUDA allocator' if device == 'cuda' else 'process peak RSS'}); "
        f"a dense fused target for this batch would add {dense / 2**20:.1f} MiB per teacher"
    )
    print("  goal: fusion <= 1.10x CLM-only in step time and in peak memory")
    if not args.no_parallel:
        bench_parallel(args, model_dir)
        if device == "cpu":
            print("  no GPU here: the bf16 figures on a GPU were not measured")
    return 0


def _parallel_rank(
    rank: int, strategy: str, model_dir: str, block: int, batch: int, k: int, steps: int, store: str
) -> None:
    """One of two ranks of a data-parallel run; prints this rank's RESULT line."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from fusion_etl.train.loss import IGNORE, fusion_loss
    from fusion_etl.train.memstat import local_bytes, peak_rss_bytes, reset_peak_rss, rss_bytes
    from fusion_etl.train.parallel import wrap_model

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    # A file store: no port to pick (a free port picked earlier can be taken by then).
    dist.init_process_group(
        "nccl" if cuda else "gloo", init_method=f"file://{store}", rank=rank, world_size=2
    )
    torch.manual_seed(0)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    par = wrap_model(
        model,
        strategy=strategy,
        world=2,
        device=device,
        bf16=cuda,
        cpu_offload=False,
        activation_checkpointing=False,
    )
    params = list(par.model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, vocab, (batch, block), generator=g).to(device)
    labels = torch.cat([ids[:, 1:], torch.full((batch, 1), IGNORE, device=device)], dim=1)
    fused_ids = torch.randint(0, vocab, (batch, block, k), generator=g).to(device)
    fused_probs = torch.rand(batch, block, k, generator=g).to(device)

    held = local_bytes(params)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = 0
    else:
        reset_peak_rss()
        base = rss_bytes() - held

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with (
            torch.autocast(device_type=device.type, dtype=torch.bfloat16)
            if par.autocast_bf16
            else torch.enable_grad()
        ):
            logits = par.model(input_ids=ids).logits
            fusion_loss(logits, labels, fused_ids, fused_probs, 0.9).total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()

    step()  # warm-up, not timed
    times = []
    for _ in range(steps):
        dist.barrier()
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    peak = int(torch.cuda.max_memory_allocated(device)) if cuda else peak_rss_bytes() - base
    state = {
        "parameters": held,
        "gradients": local_bytes(p.grad for p in params if p.grad is not None),
        "optimizer": local_bytes(
            v
            for st in optimizer.state.values()
            for v in st.values()
            if torch.is_tensor(v) and v.ndim
        ),
    }
    result = {
        "rank": rank,
        "step_s": statistics.median(times),
        "peak_bytes": peak,
        "state": state,
        "device": device.type,
    }
    # One file per rank: two processes printing to one pipe can interleave their lines.
    with open(f"{store}.rank{rank}", "w") as fh:
        json.dump(result, fh)
    dist.destroy_process_group()


def _parallel_main(
    strategy: str, model_dir: str, block: int, batch: int, k: int, steps: int
) -> None:
    import importlib

    # torch.multiprocessing re-exports spawn without types.
    spawn: Any = importlib.import_module("torch.multiprocessing").spawn
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        spawn(_parallel_rank, args=(strategy, model_dir, block, batch, k, steps, store), nprocs=2)
        for rank in range(2):
            with open(f"{store}.rank{rank}") as fh:
                print("RESULT " + fh.read(), flush=True)


def bench_parallel(args: argparse.Namespace, model_dir: str) -> None:
    """FSDP2 vs DDP at two workers, alternated, each run in fresh processes."""
    from fusion_etl.config import TrainConfig
    from fusion_etl.train.memory import memory_plan

    with open(os.path.join(model_dir, "config.json")) as fh:
        config = json.load(fh)
    runs: dict[str, list[list[dict[str, Any]]]] = {"ddp": [], "fsdp": []}
    # A fixed mmap threshold returns every large tensor to the OS when freed, so a CPU worker's
    # peak RSS follows the tensors it held (glibc's dynamic threshold keeps freed ones around).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for _ in range(args.rounds):
        for strategy in ("ddp", "fsdp"):
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "fusion_etl.bench.train",
                    "_parallel",
                    strategy,
                    model_dir,
                    str(args.block),
                    str(args.parallel_batch),
                    str(args.k),
                    str(args.steps),
                ],
                capture_output=True,
                text=True,
                check=False,
                env=env,
            )
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if len(lines) != 2:
                raise RuntimeError(
                    f"parallel benchmark ({strategy}) failed (exit {proc.returncode}):\n"
                    f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
                )
            runs[strategy].append(
                sorted((json.loads(x[7:]) for x in lines), key=lambda r: r["rank"])
            )
    device = runs["ddp"][0][0]["device"]
    print(
        f"\ndata-parallel at 2 workers on {device} ({'bf16' if device == 'cuda' else 'fp32'}): "
        f"{args.parallel_batch} x {args.block} tokens per worker per step, {args.steps} steps x "
        f"{args.rounds} rounds (medians)\n"
    )
    print(
        f"{'strategy':<10}{'step ms':>10}{'peak MiB/worker':>17}{'plan MiB':>10}"
        f"{'params+grads+optim MiB/worker':>31}"
    )
    med: dict[str, dict[str, float]] = {}
    for strategy, rounds in runs.items():
        flat = [r for rs in rounds for r in rs]
        plan = memory_plan(
            config,
            TrainConfig(
                strategy=strategy,  # type: ignore[arg-type]
                num_workers=2,
                micro_batch=args.parallel_batch,
                block_size=args.block,
                use_gpu=device == "cuda",
            ),
            top_k=args.k,
        )
        med[strategy] = {
            "step_s": statistics.median(r["step_s"] for r in flat),
            "peak": statistics.median(r["peak_bytes"] for r in flat),
            "state": statistics.median(sum(r["state"].values()) for r in flat),
        }
        print(
            f"{strategy:<10}{med[strategy]['step_s'] * 1000:>10.1f}{med[strategy]['peak'] / 2**20:>17.1f}"
            f"{(plan.total - plan.reserve) / 2**20:>10.1f}{med[strategy]['state'] / 2**20:>31.2f}"
        )
    print(
        f"{'fsdp/ddp':<10}{med['fsdp']['step_s'] / med['ddp']['step_s']:>9.2f}x"
        f"{med['fsdp']['peak'] / med['ddp']['peak']:>16.2f}x{'':>10}"
        f"{med['fsdp']['state'] / med['ddp']['state']:>30.2f}x"
    )
    print(
        "  expected: FSDP's parameter, gradient and optimizer bytes per worker about half of DDP's"
    )


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
    tr.add_argument(
        "--parallel-batch",
        type=int,
        default=4,
        help="blocks per worker per step in the FSDP vs DDP part (default 4)",
    )
    tr.add_argument("--no-parallel", action="store_true", help="skip FSDP vs DDP at two workers")
    tr.set_defaults(run=bench_train)


if __name__ == "__main__":
    a = sys.argv
    if len(a) == 9 and a[1] == "_train":
        _train_worker(a[2], float(a[3]), int(a[4]), int(a[5]), int(a[6]), int(a[7]), a[8])
    if len(a) == 8 and a[1] == "_parallel":
        _parallel_main(a[2], a[3], int(a[4]), int(a[5]), int(a[6]), int(a[7]))
