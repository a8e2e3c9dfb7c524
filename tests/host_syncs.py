"""Counting the calls that make the host wait for the GPU, on a CPU run (used by tests/host_sync_check.py).

On a GPU each of these blocks the Python thread until every kernel queued before it has run, so the GPU idles
while the host catches up: reading a device tensor (``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``,
``bool()``, ``float()``, ``int()``), a blocking copy to the device (``.to(device)`` / ``torch.tensor(...,
device=...)`` without ``non_blocking``, which ends in a stream synchronisation), and explicit synchronisation
(``torch.cuda.synchronize``, DeepSpeed's ``get_accelerator().synchronize()``), and ``masked_fill(mask, tensor)``,
whose CUDA kernel reads the fill value with ``.item()`` (found by counting with CUDA's own sync-debug mode on an
H200: benchmarks/bench_gpu_trainer.py). On a CPU run the same Python calls happen (the code paths are
device-independent), so patching them counts what a GPU run would pay.

Each call is attributed to the innermost frame outside torch: ``trainer`` (this repository: trainer/, models/,
data_pipeline/), ``deepspeed`` or ``other``. Tensors reduced over the trainer's host gloo group
(``trainer.engine.distributed.host_group``) live in host memory on every device; reading them is not a GPU wait
and is recorded as ``host``.
"""
from __future__ import annotations

import os
import sys
import weakref
from collections import Counter

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
HERE = os.path.abspath(__file__)
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


def _has_device(args, kwargs) -> bool:
    if kwargs.get("device") is not None:
        return True
    return any(isinstance(a, torch.device) or (isinstance(a, str) and a.split(":")[0] in ("cpu", "cuda", "meta"))
               for a in args)


def frame_origin(frame, skip: tuple = ()) -> tuple[str, str]:
    """(origin, site) of the innermost frame, from ``frame`` outwards, outside torch, this file and ``skip``:
    origin "trainer" (this repository), "deepspeed" or "other". Shared with benchmarks/bench_gpu_trainer.py, which
    attributes CUDA's own sync-debug warnings by the same rule."""
    skip = (HERE, *skip)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path not in skip and not path.startswith(TORCH_DIR):
            site = f"{os.path.relpath(path, REPO) if path.startswith(REPO) else path}:{frame.f_lineno} " \
                   f"{frame.f_code.co_name}"
            if path.startswith(REPO):
                return "trainer", site
            if f"{os.sep}deepspeed{os.sep}" in path:
                return "deepspeed", site.split("site-packages" + os.sep)[-1]
            return "other", site.split("site-packages" + os.sep)[-1]
        frame = frame.f_back
    return "other", "?"


class HostSyncCounter:
    """Context manager; ``records`` holds (bucket, origin, kind, site) for every counted call."""

    def __init__(self):
        self.bucket = None  # set by the driver: which step the calls belong to (None: not counted)
        self.records: list[tuple] = []
        self._host: dict = {}  # id -> weakref of tensors reduced over the host group (Tensor == is elementwise)
        self._saved: list = []

    # ------------------------------------------------------------------ attribution
    def _origin(self) -> tuple[str, str]:
        return frame_origin(sys._getframe(2))

    def _record(self, kind: str, tensor=None) -> None:
        if self.bucket is None:
            return
        if tensor is not None and (ref := self._host.get(id(tensor))) is not None and ref() is tensor:
            kind = f"host:{kind}"
        origin, site = self._origin()
        self.records.append((self.bucket, origin if not kind.startswith("host:") else "host", kind, site))

    # ------------------------------------------------------------------ patches
    def _patch(self, owner, name, make):
        original = getattr(owner, name)
        self._saved.append((owner, name, original))
        setattr(owner, name, make(original))

    def __enter__(self):
        import torch.distributed as dist

        from trainer.engine.distributed import host_group

        counter = self
        for name in READS:
            def make(original, kind=name.strip("_")):
                def wrapper(t, *args, **kwargs):
                    counter._record(kind, t)
                    return original(t, *args, **kwargs)
                return wrapper
            self._patch(torch.Tensor, name, make)

        def make_to(original):
            def to(t, *args, **kwargs):
                if _has_device(args, kwargs) and not kwargs.get("non_blocking", False) and \
                        not (len(args) > 1 and args[1] is True):
                    counter._record("to(device)", t)
                return original(t, *args, **kwargs)
            return to
        self._patch(torch.Tensor, "to", make_to)

        def make_factory(original, kind):
            def factory(*args, **kwargs):
                if kwargs.get("device") is not None:
                    counter._record(kind)
                return original(*args, **kwargs)
            return factory
        self._patch(torch, "tensor", lambda o: make_factory(o, "tensor(device=)"))
        self._patch(torch, "as_tensor", lambda o: make_factory(o, "as_tensor(device=)"))

        def make_masked_fill(original, kind):
            def masked_fill(t, mask, value, *args, **kwargs):
                if isinstance(value, torch.Tensor):  # CUDA reads a tensor fill value with .item() inside the op
                    counter._record(kind, value)
                return original(t, mask, value, *args, **kwargs)
            return masked_fill
        for name in ("masked_fill", "masked_fill_"):
            self._patch(torch.Tensor, name, lambda o, kind=f"{name}(tensor value)": make_masked_fill(o, kind))

        def make_sync(original):
            def sync(*args, **kwargs):
                counter._record("cuda.synchronize")
                return original(*args, **kwargs)
            return sync
        self._patch(torch.cuda, "synchronize", make_sync)
        try:
            from deepspeed.accelerator import get_accelerator

            accel = get_accelerator()
            self._patch(accel, "synchronize", lambda o: (lambda *a, **k: (counter._record("accelerator.synchronize"),
                                                                            o(*a, **k))[1]))
        except ImportError:
            pass

        def make_host_collective(original):
            def collective(tensor, *args, **kwargs):
                group = kwargs.get("group", args[1] if len(args) > 1 else None)
                if group is not None and group is host_group():
                    counter._host[id(tensor)] = weakref.ref(tensor)
                return original(tensor, *args, **kwargs)
            return collective
        self._patch(dist, "all_reduce", make_host_collective)
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()
        return False

    # ------------------------------------------------------------------ results
    def per_bucket(self, origin: str) -> Counter:
        return Counter(b for b, o, _, _ in self.records if o == origin)

    def sites(self, origin: str, buckets) -> Counter:
        buckets = set(buckets)
        return Counter(f"{kind} @ {site}" for b, o, kind, site in self.records if o == origin and b in buckets)
