"""The training step without host <-> device waits (rwkv_diffusion_rnn/host_sync.py).

On this CPU-only machine a CUDA sync cannot be seen, so the step is run under a dispatch mode that records every op
which would make the host wait on a GPU (reading a value, a value-sized index) outside the code marked host-side.
The step that keeps its decisions on the device must also train exactly as the one that reads them on the host.
(On a GPU, ``bench/gpu_check_sync.py`` runs the step under CUDA's own sync detector.)"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from rwkv_diffusion_rnn.host_sync import HOST_MASK, host_side, in_host_side, pack_by_dtype, to_device, unpack
from rwkv_diffusion_rnn.improved_trainer import Trainer
from tests.train_helpers import make_cfg, make_setup

aten = torch.ops.aten
#: ops that make the host wait for a GPU: a value read back, or an output whose size depends on values
WAITING = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
}


class WaitDetector(TorchDispatchMode):
    """Records the ops that would wait on a GPU, outside :func:`host_side` code."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bool_index = func is aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else [])
        )
        if (func in WAITING or bool_index) and not in_host_side():
            self.waits.append(str(func))
        return func(*args, **kwargs)


class ReadDetector(TorchFunctionMode):
    """Records the Python-level reads of a tensor's values (which on a GPU wait for it), outside :func:`host_side`
    code: these never reach the dispatcher, so :class:`WaitDetector` cannot see them."""

    READS = {"tolist", "cpu", "numpy", "item", "__bool__", "__float__", "__int__", "__index__"}

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS and not in_host_side():
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def test_the_detector_sees_a_read_and_a_value_sized_index_but_not_host_side_work():
    x = torch.randn(5, generator=torch.Generator().manual_seed(31))
    with WaitDetector() as d:
        float(x.sum())
        x[x > 0].sum()
        with host_side():
            (x > 0).nonzero()
    assert any("_local_scalar_dense" in w for w in d.waits) and any("index" in w or "nonzero" in w for w in d.waits)
    assert len(d.waits) == 2, d.waits
    with ReadDetector() as r:
        x.tolist(), x.numpy(), x.cpu()
        with host_side():
            x.tolist()
    assert r.reads == ["tolist", "numpy", "cpu"], r.reads


def test_packing_by_dtype_round_trips_values_shapes_and_dtypes():
    g = torch.Generator().manual_seed(32)
    xs = [torch.randn(3, 4, generator=g), torch.rand(5, generator=g) < 0.5, torch.randint(0, 9, (7,), generator=g),
          torch.randn(2, generator=g), torch.empty(0, 3), torch.randn((), generator=g),
          torch.rand(2, 2, generator=g) < 0.5]  # fmt: skip
    packs = pack_by_dtype(xs)
    assert sorted(len(idx) for _, idx in packs) == [1, 2, 4]  # one buffer per dtype
    assert {flat.dtype for flat, _ in packs} == {torch.float32, torch.bool, torch.int64}
    got = unpack([(flat.clone(), idx) for flat, idx in packs], [x.shape for x in xs])
    for a, b in zip(got, xs, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    assert all(a is b for a, b in zip(to_device(xs, "cpu"), xs, strict=True))  # the host: nothing to copy
    if torch.cuda.is_available():
        for a, b in zip(to_device(xs, "cuda"), xs, strict=True):
            assert a.device.type == "cuda" and a.dtype == b.dtype and torch.equal(a.cpu(), b)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory, "sync")


@pytest.mark.parametrize("device_cache", [False, True])
def test_a_training_step_has_no_wait_outside_its_host_side_work(setup, tmp_path, device_cache):
    cfg = make_cfg(setup, tmp_path, training__loss_type="mixed", training__ema_decay=0.99, data__max_samples=16,
                   diffusion__clean_prefix=0.3, data__device_cache=device_cache)  # fmt: skip
    trainer = Trainer(cfg)
    assert trainer._steps_on_device()
    trainer.train_step(sync=False)
    assert all(HOST_MASK in b for b in trainer.data.micro_batches(trainer.step))  # the mask's host copy comes along
    with WaitDetector() as d, ReadDetector() as r:
        rec = trainer.train_step(sync=False)
        trainer.train_step(sync=False)
    assert d.waits == [] and r.reads == [], (d.waits, r.reads)
    got = trainer.read_metrics(rec)
    assert got["step"] == 2 and got["skipped"] == 0 and got["loss"] > 0 and got["grad_norm"] > 0


def _plant_nan(step, rank, batch):
    if step == 2:
        batch = dict(batch, latent=batch["latent"].clone())
        batch["latent"][0, 0] = float("nan")
    return batch


def test_device_decisions_train_exactly_as_host_decisions(setup, tmp_path):
    """Clipping, the skip of a non-finite step and the EMA decided on the device give the weights, moments, EMA and
    metrics of the same run deciding on the host."""
    runs = []
    for on_device in (True, False):
        cfg = make_cfg(setup, tmp_path / str(on_device), training__loss_type="mixed", training__ema_decay=0.9,
                       training__max_grad_norm=0.05, training__max_steps=5)  # fmt: skip
        trainer = Trainer(cfg)
        trainer.batch_hook = _plant_nan
        if not on_device:
            trainer._steps_on_device = lambda: False
        recs = [trainer.train_step(sync=on_device) for _ in range(5)]
        recs = [trainer.read_metrics(r) for r in recs]
        runs.append((trainer, recs))
    (a, ra), (b, rb) = runs
    assert [r["skipped"] for r in ra] == [r["skipped"] for r in rb] == [0, 0, 1, 0, 0]
    assert a.skipped == b.skipped == 1 and a.ema.num_updates == b.ema.num_updates == 4
    for x, y in zip(ra, rb, strict=True):
        assert x["skipped_total"] == y["skipped_total"]
        for k in ("loss", "grad_norm", "masked_acc"):
            assert x[k] == y[k] or (x[k] != x[k] and y[k] != y[k]), (k, x[k], y[k])
    ta, tb = a.trainable_tensors(), b.trainable_tensors()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    sa, sb = list(a.optimizer.state.values()), list(b.optimizer.state.values())
    assert all(torch.equal(x["exp_avg_sq"], y["exp_avg_sq"]) and torch.equal(x["step"], y["step"])
               for x, y in zip(sa, sb, strict=True))  # fmt: skip
    assert all(float(x["step"]) == 4 for x in sa)  # the skipped step did not count
    for k in a.ema.shadow:
        torch.testing.assert_close(a.ema.shadow[k], b.ema.shadow[k], rtol=1e-6, atol=1e-7)
