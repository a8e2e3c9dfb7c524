"""In-training FID of the EMA model (``log.eval_every``), data-parallel over every rank, recorded like trainer.evaluate.

Why in the loop and not only as a separate job: the validation loss (trainer/loop/validation.py) says whether the
denoiser fits held-out data, not whether its samples look right; a sample-quality curve during training tells when
guidance, EMA or a resolution stage pays off without waiting for a checkpoint to be evaluated elsewhere.

What is computed is what ``python -m trainer.evaluate`` computes for the same weights: sample i (class
``classes[i // per_class]``) starts from noise keyed by (sample.seed, i) alone (trainer/monitor/sampling.py), with the
run's sampler, steps and guidance scale, decoded by the shard set's VAE. So the number does not depend on the layout
or the number of ranks, and ``trainer.evaluate --seed <sample.seed> --ref <the cached reference>`` on the checkpoint
of the same step reproduces it (tests/test_eval_in_training.py).

* Every rank gets the full EMA (gathered to rank 0, then broadcast tensor by tensor) in a plain DiT at the stage's
  resolution: sampling then runs the same on ZeRO-3, tensor, pipeline and expert layouts, and every rank (model-
  parallel ones too) samples its own share ``i % world == rank``. The copy is freed after the evaluation.
* Features stay where they are made: each rank sums its features and their outer products (float64) and one
  all-reduce of D + D² numbers gives the Gaussian statistics (trainer/monitor/fid.py ``feature_moments``).
* The reference is ``log.eval_ref`` (an ADM reference batch) or, by default, the stage's held-out latents decoded by
  the same VAE (``log.eval_ref_samples`` of them), computed data-parallel once and cached in
  ``run.dir/eval/reference-*.npz`` (mu, sigma): a distance to the VAE's reconstructions of held-out data, which
  isolates what the diffusion model adds. The record says which reference it used.
* The record (``evals.jsonl``, which trainer.status shows and the W&B sink forwards as ``eval/*``) names its feature
  extractor (name, file, dim, sha256); the distance is ``fid`` only for Inception-v3 pool3 features, else
  ``fd_<extractor>``. Errors inside the extractor propagate and stop the run: they are never retried away.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist

from trainer import rundir
from trainer.config.shards import val_shard_set
from trainer.engine.distributed import all_reduce_max_flags, barrier
from trainer.loop.grids import ema_model_on_every_rank, grid_vae
from trainer.monitor.fid import feature_moments, frechet_distance, load_feature_extractor, reference_statistics, \
    statistics_from_moments
from trainer.monitor.sampling import images_to_uint8, noise_for, sample_batch, sample_indices


class InTrainingEvaluation:
    """``after_step(stage)`` every ``log.eval_every`` steps (collective: every rank calls it)."""

    def __init__(self, trainer):
        self.tr = trainer
        self.log = trainer.cfg.log
        self.every = self.log.eval_every
        self.extractor = None  # loaded on first use, on this rank's device
        self.references: dict = {}  # stage index -> (mu, sigma, description) on rank 0, (None, None, None) elsewhere

    @property
    def enabled(self) -> bool:
        return self.every > 0

    def after_step(self, stage) -> None:
        if self.enabled and self.tr.state.step % self.every == 0:
            self.evaluate(stage)

    def _extractor(self):
        if self.extractor is None:
            self.extractor = load_feature_extractor(self.log.eval_extractor, self.tr.device,
                                                    self.log.eval_extractor_name or None)
        return self.extractor

    def _reduce_moments(self, parts: list) -> tuple[int, np.ndarray, np.ndarray]:
        """Sum (count, sum, outer) over this rank's batches, then over all ranks (every rank holds features)."""
        dim, flat = 0, np.zeros(1)
        if parts:
            n = sum(p[0] for p in parts)
            total, outer = sum(p[1] for p in parts), sum(p[2] for p in parts)
            dim = len(total)
            flat = np.concatenate([[n], total, outer.ravel()])
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world > 1:
            width = torch.tensor([dim], dtype=torch.int64, device=self.tr.device)
            dist.all_reduce(width, op=dist.ReduceOp.MAX)  # a rank without samples learns the feature width
            dim = int(width.item())
            if not parts:
                flat = np.zeros(1 + dim + dim * dim)
            t = torch.from_numpy(flat).to(self.tr.device)  # float64
            dist.all_reduce(t)
            flat = t.cpu().numpy()
        return int(round(flat[0])), flat[1:1 + dim], flat[1 + dim:].reshape(dim, dim)

    def _features(self, images: np.ndarray, parts: list) -> None:
        feats, _ = self._extractor()(images)  # an error inside the network propagates
        parts.append(feature_moments(feats))

    def _reference(self, stage, total: int):
        """(mu, sigma, description) on rank 0, (None, None, None) elsewhere. Collective when it must be computed."""
        tr, log = self.tr, self.log
        if stage.index in self.references:
            return self.references[stage.index]
        ex = self._extractor()
        if log.eval_ref:
            if tr.rank == 0:
                from data_pipeline.pca_autoencoder import file_sha256

                mu, sigma = reference_statistics(log.eval_ref, ex)
                self.references[stage.index] = (mu, sigma, {"kind": "reference batch",
                                                            "path": os.path.abspath(log.eval_ref),
                                                            "sha256": file_sha256(log.eval_ref)})
            return self.references.setdefault(stage.index, (None, None, None))
        shards = tr.shard_sets[stage.index]
        n = log.eval_ref_samples or total
        val = val_shard_set(tr.cfg, stage, shards, n, "the FID reference")
        path = os.path.join(tr.run_dir, "eval", f"reference-stage{stage.index}-{stage.resolution}px-{n}-"
                                                f"{ex.sha256[:12]}.npz")
        (missing,) = all_reduce_max_flags([tr.rank == 0 and not os.path.isfile(path)])
        if missing:
            self._compute_reference(stage, val.directory, n, path)
        if tr.rank == 0:
            with np.load(path) as data:
                mu, sigma = data["mu"], data["sigma"]
            self.references[stage.index] = (mu, sigma, {
                "kind": "held-out latents decoded by the shard set's VAE", "shards": os.path.abspath(val.directory),
                "num_samples": n, "statistics": os.path.abspath(path)})
        # every rank remembers the stage (None off rank 0): all of them must skip the collectives above next time
        return self.references.setdefault(stage.index, (None, None, None))

    @torch.no_grad()
    def _compute_reference(self, stage, directory: str, n: int, path: str) -> None:
        from data_pipeline.val_split import read_samples

        tr = self.tr
        keys, latents, _ = read_samples(directory, n)
        if len(keys) < n:
            raise RuntimeError(f"FID reference: validation shard set {directory} holds {len(keys)} usable samples; "
                               f"log.eval_ref_samples (or the samples drawn) = {n}")
        world = dist.get_world_size() if dist.is_initialized() else 1
        mine = sample_indices(n, tr.rank, world)
        vae = grid_vae(tr.shard_sets[stage.index], tr.device)
        parts: list = []
        for b in range(0, len(mine), self.log.eval_batch):
            z = torch.from_numpy(latents[mine[b:b + self.log.eval_batch]]).to(tr.device).float()  # (B, C, h, w)
            self._features(images_to_uint8(vae.decode(z)), parts)
        count, total, outer = self._reduce_moments(parts)
        if tr.rank == 0:
            mu, sigma = statistics_from_moments(count, total, outer)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}.npz"
            np.savez(tmp, mu=mu, sigma=sigma, num_samples=count)
            os.replace(tmp, path)  # atomic: a killed run leaves no half-written reference

    @torch.no_grad()
    def evaluate(self, stage) -> dict | None:
        """Collective. Appends the record to evals.jsonl on rank 0 and returns it there (None elsewhere)."""
        tr, s = self.tr, self.tr.cfg.sample
        beacon = getattr(tr, "beacon", None)
        if beacon is not None:
            beacon.enter("evaluation")
        t0 = time.perf_counter()
        model, arch = ema_model_on_every_rank(tr, stage)
        classes = list(s.classes) or list(range(arch.num_classes))
        per_class = self.log.eval_per_class
        total = len(classes) * per_class
        world = dist.get_world_size() if dist.is_initialized() else 1
        mine = sample_indices(total, tr.rank, world)
        shards = tr.shard_sets[stage.index]
        vae = grid_vae(shards, tr.device)
        parts: list = []
        for b in range(0, len(mine), self.log.eval_batch):
            idx = mine[b:b + self.log.eval_batch]
            labels = torch.tensor([classes[i // per_class] for i in idx])
            images = sample_batch(model, tr.objective, vae, labels, noise_for(idx, shards.latent_shape, s.seed),
                                  cfg_scale=s.cfg_scale, steps=s.steps, method=s.method,
                                  num_classes=arch.num_classes, device=tr.device)
            self._features(images, parts)
            if beacon is not None:
                beacon.enter("evaluation")  # each batch is progress: a long evaluation is not a hang
        del model
        count, feat_sum, outer = self._reduce_moments(parts)
        sample_seconds = time.perf_counter() - t0
        mu_ref, sigma_ref, reference = self._reference(stage, total)
        record = None
        if tr.rank == 0:
            ex = self._extractor()
            mu, sigma = statistics_from_moments(count, feat_sum, outer)
            if np.shape(mu_ref)[-1] != len(mu):
                raise ValueError(f"FID reference {reference}: {np.shape(mu_ref)[-1]}-d statistics, the extractor "
                                 f"{ex.name} gives {len(mu)}-d features")
            record = {"step": tr.state.step, "source": "training", "stage": stage.index,
                      "resolution": stage.resolution, "num_samples": count, "per_class": per_class,
                      "cfg_scale": s.cfg_scale, "sampler": s.method, "sampling_steps": s.steps, "seed": s.seed,
                      "world_size": world, ex.metric_name(): frechet_distance(mu, sigma, mu_ref, sigma_ref),
                      "feature_extractor": ex.describe(), "reference": reference,
                      "sample_seconds": sample_seconds, "seconds": time.perf_counter() - t0, "time": time.time()}
            with open(rundir.evals_path(tr.run_dir), "a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"[trainer] step {tr.state.step}: {ex.metric_name()} {record[ex.metric_name()]:.4f} "
                  f"({count} EMA samples, {record['seconds']:.1f} s)", flush=True)
        barrier()
        return record
