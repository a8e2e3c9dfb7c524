"""How long moving a DiT-B/2 ZeRO-2 checkpoint from 2 ranks to 4 takes, through the real trainer on CPU ranks: our
conversion (trainer/state/reshard.py) in one process and inside the 4-rank launch, beside DeepSpeed's own
``ds_to_universal`` on the same checkpoint.

1. ``deepspeed --num_gpus 2 trainer/main.py`` trains DiT-B/2 one step (latent 4×8×8 from the demo shards, so the
   step is cheap; checkpoint size does not depend on the latent size) and writes its ZeRO-2 checkpoint;
2. ``python -m trainer.convert RUN --universal`` converts it in one process (timed);
3. DeepSpeed's ``ds_to_universal`` (2 extract + 2 merge workers, as ``trainer/state/convert.py`` runs it for
   ZeRO-3 checkpoints) converts the same checkpoint into a scratch folder (timed: the peer);
4. the conversion is deleted and ``deepspeed --num_gpus 4 trainer/main.py`` resumes on 4 ranks, which convert
   together first (the trainer's "converted for a new layout in" line) and train one more step (wall time).

    python benchmarks/bench_convert.py [--model DiT-B/2] [--data /tmp/bench_demo]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _run(cmd: list[str]) -> tuple[float, str]:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), WANDB_MODE="disabled")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-4000:]}")
    return elapsed, proc.stdout + proc.stderr


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="DiT-B/2")
    p.add_argument("--data", default="/tmp/bench_convert_data")
    p.add_argument("--run", default="/tmp/bench_convert_run")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "convert.json"))
    args = p.parse_args(argv)
    from results_io import write_results
    from trainer.engine.distributed import free_port
    from trainer.state.convert import universal_path
    from trainer.state.integrity import list_files

    if not os.path.exists(os.path.join(args.data, "64", "manifest.json")):
        _run([sys.executable, "-m", "data_pipeline.demo_data", "--out", args.data, "--resolutions", "64",
              "--samples-per-class", "20", "--vae", "pca", "--no-progress"])
    shutil.rmtree(args.run, ignore_errors=True)
    common = ["--config", "configs/tiny.yaml", "--ds_config", "zero2.json", f"data.root={args.data}",
              f"run.dir={args.run}", f"model.name={args.model}", "model.hidden_size=null", "model.depth=null",
              "model.num_heads=null", "model.patch_size=null", "train.global_batch=4", "train.micro_batch=1",
              "checkpoint.every=1", "sample.per_class=1", "sample.steps=2", "sample.classes=[0]",
              "log.stall_minutes=0"]
    train2, _ = _run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "trainer/main.py", *common,
                      "train.max_steps=1"])
    ck = os.path.join(args.run, "checkpoints", "step00000001")
    size = sum(list_files(ck).values())
    convert, out = _run([sys.executable, "-m", "trainer.convert", args.run, "--universal"])
    m = re.search(r"converted in ([\d.]+) s", out)
    peer_out = args.run + "-deepspeed-universal"
    shutil.rmtree(peer_out, ignore_errors=True)
    peer, _ = _run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", ck,
                    "--output_folder", peer_out, "--inject_missing_state", "--num_extract_workers", "2",
                    "--num_merge_workers", "2"])
    shutil.rmtree(peer_out, ignore_errors=True)
    shutil.rmtree(universal_path(ck))
    resume4, log4 = _run(["deepspeed", "--num_gpus", "4", "--master_port", str(free_port()), "trainer/main.py",
                          *common, "train.max_steps=2"])
    in_launch = re.search(r"converted for a new layout in ([\d.]+) s", log4)
    assert "resumed from" in log4 and in_launch, log4[-3000:]
    record = {
        "command": "python benchmarks/bench_convert.py " + " ".join(argv or sys.argv[1:]),
        "model": args.model, "checkpoint_bytes": size, "source": "2 ranks, ZeRO-2", "target": "4 ranks, ZeRO-2",
        "convert_seconds": float(m.group(1)) if m else convert, "convert_command_seconds": convert,
        "deepspeed_ds_to_universal_seconds": peer, "convert_in_4_rank_launch_seconds": float(in_launch.group(1)),
        "train_2_ranks_1_step_seconds": train2, "resume_4_ranks_convert_and_1_step_seconds": resume4,
        "machine": "2-core Xeon (avx512_bf16, no AMX), local disk; shared with other jobs (see load in the note)",
        "load_average": os.getloadavg(),
    }
    print(f"{args.model} ZeRO-2 checkpoint {size / 2**20:.0f} MiB, 2 -> 4 ranks: our conversion in one process "
          f"{record['convert_seconds']:.1f} s (command {convert:.1f} s), in the 4-rank launch "
          f"{record['convert_in_4_rank_launch_seconds']:.1f} s; DeepSpeed ds_to_universal {peer:.1f} s; "
          f"4-rank resume incl. conversion + 1 step {resume4:.1f} s")
    write_results(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
