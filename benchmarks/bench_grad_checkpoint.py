"""Activation memory and step time of a DiT-S/2 training step with gradient checkpointing off / every block / every 2nd.

Memory: each variant runs in its own subprocess (so peak RSS, ru_maxrss, is that variant's alone) and counts
the bytes autograd saves for backward with torch.autograd.graph.saved_tensors_hooks, deduplicated by
storage and excluding parameter storages (weights are not activations). With non-reentrant checkpointing,
tensors saved inside a checkpointed block go to the checkpoint's own hooks and are dropped; only what the
step really keeps (block inputs, un-checkpointed layers) reaches the outer hooks.
Time: measured in one process with the variants interleaved step by step (the model switches with
set_grad_checkpointing), median of the repeats, so machine-load drift hits all variants alike.

    python benchmarks/bench_grad_checkpoint.py [--repeats 6] [--batch 8] [--input-size 32]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import DiTArgs  # noqa: E402

VARIANTS = {"off": 0, "every block": 1, "every 2nd block": 2}


def make_step(model: torch.nn.Module, batch: int, input_size: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, input_size, input_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, 1000, (batch,), generator=g)
    target = torch.randn(batch, 8, input_size, input_size, generator=g)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def forward_loss() -> torch.Tensor:
        return torch.nn.functional.mse_loss(model(x, t, y), target)

    def step(loss: torch.Tensor | None = None) -> None:
        loss = forward_loss() if loss is None else loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return forward_loss, step


def build(input_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = DiTArgs.from_preset("DiT-S/2", input_size=input_size).build()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.add_(0.02 * torch.randn_like(p))
    return model.train()


def saved_activation_bytes(model: torch.nn.Module, forward_loss) -> tuple[int, torch.Tensor]:
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in param_storages:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = forward_loss()
    return sum(storages.values()), loss


def worker(every: int, batch: int, input_size: int) -> None:
    """One variant in a fresh process: saved bytes of a step, then a few steps for peak RSS."""
    torch.set_num_threads(2)
    model = build(input_size)
    model.set_grad_checkpointing(every)
    forward_loss, step = make_step(model, batch, input_size)
    rss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm: optimizer state allocated
    saved, loss = saved_activation_bytes(model, forward_loss)
    step(loss)
    step()
    print(json.dumps(dict(saved_bytes=saved, peak_rss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                          rss_after_build_kb=rss_before_kb)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_grad_checkpoint.json"))
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.batch, args.input_size)
        return
    torch.set_num_threads(2)

    memory = {}
    for name, every in VARIANTS.items():
        result = subprocess.run(
            [sys.executable, __file__, "--worker", str(every), "--batch", str(args.batch), "--input-size", str(args.input_size)],
            check=True, capture_output=True, text=True,
        )
        memory[name] = json.loads(result.stdout.strip().splitlines()[-1])

    model = build(args.input_size)
    forward_loss, step = make_step(model, args.batch, args.input_size)
    for every in VARIANTS.values():
        model.set_grad_checkpointing(every)
        for _ in range(args.warmup):
            step()
    times = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, every in VARIANTS.items():
            model.set_grad_checkpointing(every)
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)

    base_saved = memory["off"]["saved_bytes"]
    base_time = statistics.median(times["off"])
    rows = []
    print(f"DiT-S/2 train step (fwd + bwd + AdamW), latent {args.input_size}x{args.input_size}, batch {args.batch}, fp32, "
          f"{args.repeats} interleaved repeats (median)")
    print(f"{'checkpointing':<18}{'saved MiB':>10}{'reduction':>11}{'step s':>9}{'extra time':>12}{'peak RSS MiB':>14}")
    for name in VARIANTS:
        saved = memory[name]["saved_bytes"]
        step_s = statistics.median(times[name])
        paired = statistics.median(b / a for a, b in zip(times["off"], times[name]))
        row = dict(variant=name, grad_checkpoint=VARIANTS[name], saved_bytes=saved, reduction=base_saved / saved,
                   step_s=step_s, extra_time=step_s / base_time - 1, extra_time_paired=paired - 1,
                   peak_rss_kb=memory[name]["peak_rss_kb"], all_step_s=times[name])
        rows.append(row)
        print(f"{name:<18}{saved / 2**20:>10.1f}{row['reduction']:>10.1f}x{step_s:>9.3f}{100 * row['extra_time']:>11.1f}%"
              f"{memory[name]['peak_rss_kb'] / 1024:>14.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(benchmark="bench_grad_checkpoint", model="DiT-S/2", batch=args.batch,
                                   input_size=args.input_size, rows=rows, torch=torch.__version__,
                                   command=" ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
