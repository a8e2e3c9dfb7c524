"""What the per-file xxh3-128 checksums add to a checkpoint save, and what verifying costs at resume.

One process (gloo), a DiT-B/2 under ZeRO-2 built the way the trainer builds it, one optimizer step so the AdamW
moments exist, then ``trainer.state.checkpoint.save_checkpoint`` timed with checksums (as shipped) and with the
hashing pass replaced by a no-op, interleaved round by round; medians. Then the resume-time verification
(``find_verified``: every file re-hashed) and the raw hashing rate.

    python benchmarks/bench_checkpoint_hash.py [--model DiT-B/2] [--rounds 3] [--dir /tmp/ckbench]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="DiT-B/2")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dir", default="/tmp/ckbench")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "checkpoint_hash.json"))
    args = p.parse_args(argv)

    import torch

    from results_io import write_results
    from models.args import DiTArgs
    from trainer.config.ds_json import fill_ds_config, load_ds_config
    from trainer.config.schema import load_config
    from trainer.engine.distributed import free_port, init_local_gloo_rank
    from trainer.engine.optimizer import optimizer_config, param_groups
    from trainer.engine.parallelize import initialize_engine
    from trainer.loop.seeding import rng_state
    from trainer.state import checkpoint as ckpt
    from trainer.state import integrity
    from trainer.state.checkpoint import TrainerState, find_verified, save_checkpoint
    from trainer.state.ema import EMA

    init_local_gloo_rank(0, 1, free_port())
    torch.manual_seed(0)
    arch = DiTArgs.from_preset(args.model, input_size=32, num_classes=1000)
    model = arch.build()
    cfg = load_config(None, ["train.global_batch=2", "train.micro_batch=2"])
    ds = fill_ds_config(load_ds_config("zero2.json"), cfg, global_batch=2, micro_batch=2, data_parallel=1, on_cuda=False)
    ds["optimizer"] = optimizer_config(cfg)
    engine, *_ = initialize_engine(model=model, model_parameters=param_groups(model, 0.0), config=ds)
    x, t, y = torch.randn(2, 4, 32, 32), torch.randint(0, 1000, (2,)), torch.randint(0, 1000, (2,))
    engine.backward(engine(x, t, y).float().pow(2).mean())
    engine.step()
    ema = EMA(engine.module, 0.9999)

    real_hash_share = ckpt._hash_share

    def no_hash(path, sizes, deep_check):  # the save as it was before checksums: sizes only
        return {"digests": {rel: "" for rel in sizes}, "problems": []}

    times = {"with_checksums": [], "without_checksums": []}
    shutil.rmtree(args.dir, ignore_errors=True)
    step = 0
    for r in range(args.rounds):
        for variant in ("without_checksums", "with_checksums") if r % 2 else ("with_checksums", "without_checksums"):
            ckpt._hash_share = real_hash_share if variant == "with_checksums" else no_hash
            step += 1
            t0 = time.perf_counter()
            save_checkpoint(engine, ema, TrainerState(step=step, model_config=arch.to_dict()), args.dir, 1, rng_state())
            times[variant].append(time.perf_counter() - t0)
            print(f"round {r} {variant}: {times[variant][-1]:.2f} s", flush=True)
    ckpt._hash_share = real_hash_share
    save_checkpoint(engine, ema, TrainerState(step=step + 1, model_config=arch.to_dict()), args.dir, 1, rng_state())
    path = os.path.join(args.dir, ckpt.tag_for_step(step + 1))
    size = sum(integrity.list_files(path).values())
    t0 = time.perf_counter()
    found, skipped = find_verified(args.dir)
    verify = time.perf_counter() - t0
    assert found == path and not skipped
    t0 = time.perf_counter()
    for rel in integrity.list_files(path):
        integrity.file_digest(os.path.join(path, rel))
    hash_only = time.perf_counter() - t0
    with_c, without = statistics.median(times["with_checksums"]), statistics.median(times["without_checksums"])
    record = {
        "command": "python benchmarks/bench_checkpoint_hash.py " + " ".join(argv or sys.argv[1:]),
        "model": args.model, "params": sum(p.numel() for p in engine.module.parameters()),
        "checkpoint_bytes": size, "zero_stage": 2, "world": 1, "rounds": args.rounds,
        "save_seconds_with_checksums": with_c, "save_seconds_without_checksums": without,
        "hashing_overhead_fraction": with_c / without - 1.0,
        "resume_verification_seconds": verify, "hash_rate_gb_per_s": size / hash_only / 1e9,
        "raw": times, "machine": "2-core Xeon (avx512_bf16, no AMX), local disk; page cache warm",
    }
    print(f"{args.model}: checkpoint {size / 2**30:.2f} GiB; save {without:.2f} s -> {with_c:.2f} s with checksums "
          f"(+{100 * record['hashing_overhead_fraction']:.1f} %); resume verification {verify:.2f} s; "
          f"hashing {record['hash_rate_gb_per_s']:.2f} GB/s")
    write_results(args.out, record)
    shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
