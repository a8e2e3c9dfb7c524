"""Held-out validation loss: fixed latents, fixed equidistant timesteps, fixed noise, raw and EMA weights.

Every ``log.val_every`` steps (and at step 0 of a fresh run, or a resumed checkpoint on a validation step that the
run directory has no record of) each stage evaluates on the first ``log.val_samples``
samples of its validation shard set (``data.val_root``, or the set the training manifest records: data_pipeline/
val_split.py), at ``log.val_timesteps`` = K timesteps spread evenly over the objective's range (diffusion: the
integer t at the centre of each of K equal bins of [0, T); flow: t = (k + ½)/K), with noise drawn from a generator
keyed by (run.seed, sample index) alone and no label dropout. The loss is the objective's per-sample MSE: the
simple ε-MSE term of the diffusion at that t, the velocity MSE of the flow. So the number depends on the weights
only: the same on any data-parallel size, after a resume, and under ZeRO-1/2/3.

Data-parallel: data-parallel rank r evaluates samples r, r + D, r + 2D, ... (tensor-parallel ranks of one replica
evaluate the same samples together, as in training); the per-timestep sums are all-reduced in float64. The EMA is
evaluated by swapping its (local, possibly ZeRO-3-partitioned) shadow into the parameters and back, so no rank
materialises a second model. Pipeline parallelism is refused at config validation (trainer/config/validate.py).

An alert fires when the EMA validation loss rises ``log.val_alert_evals`` evaluations in a row.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist

from trainer import rundir
from trainer.config.shards import val_shard_set


def val_timesteps(objective, k: int) -> torch.Tensor:
    """(K,) the fixed evaluation timesteps: equidistant bin centres of the objective's range."""
    if getattr(objective, "kind", "diffusion") == "flow":
        return (torch.arange(k, dtype=torch.float32) + 0.5) / k
    steps = int(objective.num_timesteps)
    return torch.tensor([int((i + 0.5) * steps / k) for i in range(k)], dtype=torch.long)


def val_noise(seed: int, index: int, k: int, shape) -> torch.Tensor:
    """(K, C, H, W) noise of validation sample ``index``: keyed by (seed, index) only, the same on every layout."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x7A11D, int(index)])
    g = torch.Generator(device="cpu").manual_seed(int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)))
    return torch.randn((k, *shape), generator=g)


def forward_flops(arch, latent_size: int) -> float:
    """Model FLOPs of one forward pass of one sample (models/flops.py, via DiT.flops_per_sample)."""
    with torch.device("meta"):
        model = arch.with_input_size(latent_size).build()
    return float(model.flops_per_sample(train=False))


def validation_cost(arch, latent_size: int, samples: int, timesteps: int) -> dict:
    """FLOPs of one evaluation (raw + EMA weights), and in training samples' worth (3 × forward each)."""
    f = forward_flops(arch, latent_size)
    total = 2 * samples * timesteps * f
    return {"forward_flops": f, "eval_flops": total, "train_sample_equivalents": total / (3 * f)}


def xl_validation_cost(samples: int, timesteps: int) -> str:
    """The cost of ``samples`` × ``timesteps`` validation (raw + EMA) for DiT-XL/2 at 256 px (latent 32), in words."""
    from models.args import DiTArgs

    c = validation_cost(DiTArgs.from_preset("DiT-XL/2", input_size=32, num_classes=1000), 32, samples, timesteps)
    return (f"{c['eval_flops'] / 1e15:.2f} PFLOP per evaluation = {c['train_sample_equivalents']:.0f} training "
            f"samples' worth ({c['train_sample_equivalents'] / 256:.1f} steps of global batch 256)")


@contextmanager
def ema_weights(ema, zero3_optimizer=None, module=None):
    """The EMA shadow in the parameters for the duration (local tensors: full, tensor-parallel slice or ZeRO-3
    partition); the trained weights put back exactly afterwards. Under ZeRO-3 (``zero3_optimizer``) every parameter is
    released first and the persistent ones (small tensors DeepSpeed keeps gathered) gathered again from the new
    partitions, as DeepSpeed's own optimizer step does; otherwise they would keep the trained values."""
    params = ema.params
    persistent = [p for p in (module.parameters() if module is not None else params) if getattr(p, "ds_persist", False)]

    def regather():
        if zero3_optimizer is not None:
            zero3_optimizer._partition_all_parameters()
            if persistent:
                persistent[0].all_gather(persistent)

    with torch.no_grad():
        if zero3_optimizer is not None:
            zero3_optimizer._partition_all_parameters()
        saved = [ema._local(p).detach().clone() for p in params]
        for s, p in zip(ema.shadow, params):
            ema._local(p).copy_(s)
        regather()
    try:
        yield
    finally:
        with torch.no_grad():
            for b, p in zip(saved, params):
                ema._local(p).copy_(b)
            regather()


class Validation:
    """The trainer's validation: ``at_start`` (fresh runs) and ``after_step`` (every ``log.val_every`` steps)."""

    def __init__(self, trainer):
        self.tr = trainer
        log = trainer.cfg.log
        self.every, self.samples, self.k, self.alert_after = log.val_every, log.val_samples, log.val_timesteps, \
            log.val_alert_evals
        self.data: dict = {}  # stage index -> (latents, labels, noise, indices) of this rank's slice
        self.rising, self.last_ema, self.alerted = 0, None, False
        self.recorded: set = set()  # steps metrics.jsonl already holds a validation record for (rank 0)
        if self.every and trainer.rank == 0:
            self._restore_trend()

    @property
    def enabled(self) -> bool:
        return self.every > 0

    def _restore_trend(self) -> None:
        """After a resume: the EMA losses already recorded (metrics.jsonl was rewound to the checkpoint's step)."""
        for r in rundir.read_jsonl(rundir.metrics_path(self.tr.run_dir)):
            if rundir.is_val_record(r):
                self._track(float(r["val/ema_loss"]), r["step"], alert=False)
                self.recorded.add(int(r["step"]))

    def _track(self, ema_loss: float, step: int, alert: bool = True) -> None:
        if self.last_ema is not None and ema_loss > self.last_ema:
            self.rising += 1
        else:
            self.rising, self.alerted = 0, False
        self.last_ema = ema_loss
        if alert and self.alert_after and self.rising >= self.alert_after and not self.alerted:
            self.alerted = True
            self.tr.metrics.alert("validation loss rising", f"step {step}: EMA validation loss {ema_loss:.5f} rose "
                                  f"{self.rising} evaluations in a row (log.val_alert_evals={self.alert_after})", "WARN")

    def describe(self, stage) -> None:
        if not self.enabled or self.tr.rank != 0:
            return
        tr = self.tr
        size = tr.shard_sets[stage.index].latent_shape[1]
        c = validation_cost(tr.arch, size, self.samples, self.k)
        print(f"[trainer] validation every {self.every} steps: {self.samples} samples × {self.k} timesteps × "
              f"(raw + EMA) = {c['eval_flops'] / 1e12:.3f} TFLOP per evaluation at {stage.resolution} px "
              f"(≈ {c['train_sample_equivalents']:.0f} training samples' worth)", flush=True)
        print(f"[trainer] the same validation of DiT-XL/2 at 256 px: {xl_validation_cost(self.samples, self.k)}", flush=True)

    def _load(self, stage):
        if stage.index in self.data:
            return self.data[stage.index]
        from data_pipeline.val_split import read_samples

        tr = self.tr
        shards = val_shard_set(tr.cfg, stage, tr.shard_sets[stage.index])
        keys, latents, labels = read_samples(shards.directory, self.samples)
        if len(keys) < self.samples:
            raise RuntimeError(f"validation shard set {shards.directory} holds {len(keys)} usable samples; "
                               f"log.val_samples={self.samples}")
        dp, r = tr.topo.data, tr.dp_rank
        idx = list(range(r, self.samples, dp))
        shape = latents.shape[1:]
        noise = torch.stack([val_noise(tr.cfg.run.seed, i, self.k, shape) for i in idx]) if idx else \
            torch.zeros((0, self.k, *shape))
        self.data[stage.index] = (torch.from_numpy(latents[idx]), torch.from_numpy(labels[idx]), noise)
        return self.data[stage.index]

    @torch.no_grad()
    def _losses(self, stage) -> torch.Tensor:
        """(K,) float64 per-timestep sums of this rank's per-sample MSE."""
        tr = self.tr
        x_all, y_all, noise_all = self._load(stage)
        ts = val_timesteps(tr.objective, self.k)
        sums = torch.zeros(self.k, dtype=torch.float64)
        mb = max(1, stage.micro_batch)
        for k in range(self.k):
            for b in range(0, len(x_all), mb):
                x = x_all[b:b + mb].to(tr.device)
                n = x.shape[0]
                t = ts[k].repeat(n).to(tr.device)
                out = tr.objective.training_losses(
                    tr.engine, x, t, noise=noise_all[b:b + mb, k].to(tr.device),
                    model_kwargs={"y": y_all[b:b + mb].to(tr.device),
                                  "force_drop_ids": torch.zeros(n, dtype=torch.long, device=tr.device)})
                sums[k] += out["mse"].double().sum().cpu()
        return sums

    def _reduce(self, sums: torch.Tensor) -> torch.Tensor:
        """Sum over data-parallel replicas: every model-parallel rank of a replica holds the same sums."""
        tr = self.tr
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world > 1:
            t = sums.to(tr.device)
            dist.all_reduce(t)
            sums = t.cpu() / (world // tr.topo.data)
        return sums / self.samples

    def evaluate(self, stage) -> dict:
        """Collective: every rank calls it. Returns the record (logged by the logging rank)."""
        tr = self.tr
        if getattr(tr, "beacon", None) is not None:
            tr.beacon.enter("validation")
        t0 = time.perf_counter()
        was_training = tr.engine.module.training
        tr.engine.module.eval()
        try:
            raw = self._reduce(self._losses(stage))
            z3 = tr.engine.optimizer if tr.engine.zero_optimization_stage() == 3 else None
            with ema_weights(tr.ema, z3, tr.engine.module):
                ema = self._reduce(self._losses(stage))
        finally:
            tr.engine.module.train(was_training)
        record = {"step": tr.state.step, "stage": stage.index, "resolution": stage.resolution,
                  "val/loss": float(raw.mean()), "val/ema_loss": float(ema.mean())}
        record.update({f"val/loss_t{i}": float(v) for i, v in enumerate(raw.tolist())})
        record.update({f"val/ema_loss_t{i}": float(v) for i, v in enumerate(ema.tolist())})
        record.update({"val/samples": self.samples, "val/timesteps": val_timesteps(tr.objective, self.k).tolist(),
                       "val/seconds": time.perf_counter() - t0, "time": time.time()})
        tr.metrics.log(record)
        self.recorded.add(tr.state.step)
        if tr.rank == 0:
            self._track(record["val/ema_loss"], tr.state.step)
        return record

    def at_start(self, stage) -> None:
        """At a stage entry on a validation step without a record (step 0 of a fresh run; a checkpoint resumed in a
        run directory that has not evaluated it): evaluate the weights as loaded. Agreed by every rank."""
        from trainer.engine.distributed import all_reduce_max_flags

        self.describe(stage)
        step = self.tr.state.step
        if not self.enabled or step % self.every:
            return
        (missing,) = all_reduce_max_flags([self.tr.rank == 0 and step not in self.recorded])
        if missing:
            self.evaluate(stage)

    def after_step(self, stage) -> None:
        if self.enabled and self.tr.state.step % self.every == 0:
            self.evaluate(stage)
