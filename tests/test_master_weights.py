"""The master-weight AdamW (rwkv_diffusion_rnn/master_weights.py) on the CPU: its torch path is torch.optim.AdamW's
update bit for bit, its state dict is the plain optimizer's, a skipped step and a missing gradient change nothing,
and its Triton kernel (run in Triton's CPU interpreter, in a subprocess: see tests/models/test_wkv7_triton.py for
why) agrees with the torch path."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


def tiny_model():
    from rwkv_diffusion_rnn.models.rwkv7 import RWKV7, RWKV7Config

    torch.manual_seed(0)
    return RWKV7(RWKV7Config.for_shape(2, 64, 97))


def lm_loss(model, ids):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())


def kernel_cases() -> dict:
    """Subprocess body (TRITON_INTERPRET=1): the kernel and the torch path on the same gradients, three steps (the
    second without a gradient for one tensor, the third skipped by found_inf), over two groups with both kinds; and
    the kernel path's gradient norm against torch's at each step."""
    from tests.triton_interpreter import fit_interpreter_to_numpy

    fit_interpreter_to_numpy()
    from rwkv_diffusion_rnn.master_weights import BLOCK, MasterAdamW

    torch.set_num_threads(1)
    shapes = {"a.weight": (64, 33), "b": (5,), "c.weight": (BLOCK + 3,), "d": (7, 300)}
    w0 = {n: torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, (n, s) in enumerate(shapes.items())}
    out, norms = {}, []
    for kernel in (False, True):
        ps = {n: torch.nn.Parameter(w.clone()) for n, w in w0.items()}
        groups = [
            {"params": [ps["a.weight"], ps["b"]], "param_names": ["a.weight", "b"], "weight_decay": 0.1},
            {"params": [ps["c.weight"], ps["d"]], "param_names": ["c.weight", "d"], "weight_decay": 0.0},
        ]
        opt = MasterAdamW(groups, ["a.weight", "c.weight"], lr=1e-2, kernel=kernel)
        gen = torch.Generator().manual_seed(7)
        for it in range(3):
            for n, p in ps.items():
                g = torch.randn(p.shape, generator=gen) * 0.1
                p.grad = None if (it == 1 and n == "d") else g.to(p.dtype)
                if it == 0 and n == "d":  # an address off the 16-byte grid: the kernel's unaligned variant
                    p.grad = torch.cat([torch.zeros(1), g.flatten()])[1:].view(p.shape)
                    assert p.grad.data_ptr() % 16

            if kernel:  # the norm kernel over the same gradients (a missing one, an unaligned one)
                gs = [p.grad.float().flatten() for p in ps.values() if p.grad is not None]
                norms.append([float(opt.grad_norm()), float(torch.linalg.vector_norm(torch.cat(gs)))])
            opt.grad_scale = torch.tensor(2.0)
            opt.found_inf = torch.tensor(1.0 if it == 2 else 0.0)
            opt.step()
        out[str(kernel)] = {
            "masters": {n: w.tolist() for n, w in opt.master_tensors().items()},
            "moments": {n: opt.state[w]["exp_avg_sq"].tolist() for n, w in opt.master_tensors().items()},
            "steps": {n: float(opt.state[w]["step"]) for n, w in opt.master_tensors().items()},
            "copies": {n: p.detach().float().tolist() for n, p in ps.items()},
            "dtypes": {n: str(p.dtype) for n, p in ps.items()},
        }
    out["norms"] = norms
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    print(json.dumps(kernel_cases()))
else:
    import pytest

    from rwkv_diffusion_rnn.errors import DiffRwkvError
    from rwkv_diffusion_rnn.master_weights import BLOCK as MW_BLOCK
    from rwkv_diffusion_rnn.master_weights import NUM_WARPS as MW_WARPS
    from rwkv_diffusion_rnn.master_weights import matmul_weight_names
    from rwkv_diffusion_rnn.optimizer import EMA, build_optimizer, clip_grads_on_device, load_optimizer_state

    def train(model, opt, steps: int, max_norm: float = 0.0) -> list[float]:
        ids = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(3))
        params = [p for p in model.parameters() if p.requires_grad]
        losses = []
        for _ in range(steps):
            loss = lm_loss(model, ids)
            loss.backward()
            if max_norm:
                clip_grads_on_device(params, max_norm, optimizer=opt)
            opt.step()
            opt.__dict__.pop("grad_scale", None)
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
        return losses

    def test_the_matmul_weights_become_bf16_views_and_the_rest_stays_fp32():
        model = tiny_model()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        low = set(matmul_weight_names(model))
        assert "blocks.0.att.key.weight" in low and "blocks.1.att.w1" in low and "head.weight" in low
        assert not {"emb.weight", "blocks.0.att.x_r", "blocks.0.att.r_k", "blocks.0.ln1.weight"} & low
        opt = build_optimizer(model, 1e-3, 0.1, master_weights=True)
        masters = opt.master_tensors()
        for n, p in model.named_parameters():
            assert p.dtype == (torch.bfloat16 if n in low else torch.float32), n
            assert torch.equal(masters[n], before[n]), n  # the masters are the fp32 weights as they were
            want = before[n].bfloat16().float() if n in low else before[n]  # the copies autocast would have made
            assert torch.equal(p.float(), want), n
        assert {g["group"] for g in opt.param_groups} == {"decay", "no_decay"}
        assert sum(len(g["params"]) for g in opt.param_groups) == len(before)

    def test_the_update_is_torch_adamw_bit_for_bit():
        """Same gradients (bf16 autocast: the matmul weights' gradients are bf16 values either way), same update:
        torch.optim.AdamW's single-tensor path over the fp32 parameters gives the same weights and losses exactly."""
        ref_model, model = tiny_model(), tiny_model()
        ref = build_optimizer(ref_model, 1e-2, 0.1)
        for g in ref.param_groups:
            g["fused"], g["foreach"] = None, False
        opt = build_optimizer(model, 1e-2, 0.1, master_weights=True)
        assert train(model, opt, 5) == train(ref_model, ref, 5)
        masters = opt.master_tensors()
        for n, p in ref_model.named_parameters():
            assert torch.equal(masters[n], p.detach()), n
            assert torch.equal(opt.state[masters[n]]["exp_avg_sq"], ref.state[p]["exp_avg_sq"]), n

    def test_flat_keeps_every_tensor_fp32_and_updates_as_torch_adamw():
        """``flat=True``: no bf16 copies; every trainable tensor stays fp32 (a view of the flat buffer) and the update
        is torch.optim.AdamW's, bit for bit, as with master weights."""
        ref_model, model = tiny_model(), tiny_model()
        ref = build_optimizer(ref_model, 1e-2, 0.1)
        for g in ref.param_groups:
            g["fused"], g["foreach"] = None, False
        opt = build_optimizer(model, 1e-2, 0.1, flat=True)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert {p.untyped_storage().data_ptr() for p in model.parameters()} == {opt.flat.untyped_storage().data_ptr()}
        assert train(model, opt, 4) == train(ref_model, ref, 4)
        for (n, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
            assert torch.equal(p.detach(), q.detach()), n

    def test_the_moments_come_at_the_first_step_or_load():
        """As torch's AdamW makes its state lazily, the moments' buffers do not exist before the first step (a CUDA
        graph's capture in the first training step then peaks without them); a load before any step makes them."""
        model = tiny_model()
        opt = build_optimizer(model, 1e-2, 0.1, flat=True)
        assert opt.flat_m is None and opt.flat_v is None and not opt.state
        assert opt.state_dict()["state"] == build_optimizer(tiny_model(), 1e-2, 0.1).state_dict()["state"] == {}
        train(model, opt, 1)
        assert opt.flat_m is not None and len(opt.state) == sum(1 for _ in model.parameters())
        fresh = build_optimizer(tiny_model(), 1e-2, 0.1, flat=True)
        load_optimizer_state(fresh, opt.state_dict())
        for w, v in zip(fresh.master_tensors().values(), opt.master_tensors().values(), strict=True):
            assert torch.equal(fresh.state[w]["exp_avg_sq"], opt.state[v]["exp_avg_sq"])
            assert fresh.state[w]["exp_avg"].untyped_storage().data_ptr() == fresh.flat_m.untyped_storage().data_ptr()

    def test_clipping_rides_on_the_step_as_with_the_fused_adamw():
        """clip_grads_on_device folds its factor into the step (grad_scale); the result stays within rounding of
        the plain fused AdamW's."""
        ref_model, model = tiny_model(), tiny_model()
        ref = build_optimizer(ref_model, 1e-2, 0.1)
        opt = build_optimizer(model, 1e-2, 0.1, master_weights=True)
        a, b = train(model, opt, 4, max_norm=0.05), train(ref_model, ref, 4, max_norm=0.05)
        assert a[0] == b[0] and all(abs(x - y) < 1e-4 * abs(y) for x, y in zip(a, b, strict=True))

    def test_state_dicts_resume_across_the_two_optimizers():
        """A plain checkpoint resumes under master weights and back, continuing exactly as the run that saved it."""
        model, twin = tiny_model(), tiny_model()
        plain = build_optimizer(model, 1e-2, 0.1)
        for g in plain.param_groups:
            g["fused"], g["foreach"] = None, False
        train(model, plain, 3)
        twin.load_state_dict(model.state_dict())
        master = build_optimizer(twin, 1e-2, 0.1, master_weights=True)
        load_optimizer_state(master, plain.state_dict())
        assert train(twin, master, 2) == train(model, plain, 2)
        back = build_optimizer(tiny_model(), 1e-2, 0.1)
        load_optimizer_state(back, master.state_dict())
        plain_by_name = {n: p for g in back.param_groups for n, p in zip(g["param_names"], g["params"], strict=True)}
        for n, w in master.master_tensors().items():
            mine, theirs = master.state[w], back.state[plain_by_name[n]]
            assert torch.equal(mine["exp_avg"], theirs["exp_avg"]) and float(theirs["step"]) == 5.0, n

    def test_a_skipped_step_and_a_missing_gradient_change_nothing():
        model = tiny_model()
        opt = build_optimizer(model, 1e-2, 0.1, master_weights=True)
        train(model, opt, 1)
        snap = copy.deepcopy(opt.state_dict())
        masters = {n: w.clone() for n, w in opt.master_tensors().items()}
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.found_inf = torch.tensor(1.0)
        opt.step()
        del opt.found_inf
        assert all(torch.equal(w, masters[n]) for n, w in opt.master_tensors().items())
        assert all(float(s["step"]) == 1.0 for s in opt.state_dict()["state"].values())
        opt.zero_grad()
        model.emb.weight.grad = torch.ones_like(model.emb.weight)  # only one tensor has a gradient
        opt.step()
        changed = [n for n, w in opt.master_tensors().items() if not torch.equal(w, masters[n])]
        assert changed == ["emb.weight"]
        steps = {n: float(opt.state[w]["step"]) for n, w in opt.master_tensors().items()}
        assert steps["emb.weight"] == 2.0 and {v for n, v in steps.items() if n != "emb.weight"} == {1.0}
        assert snap["param_groups"][0]["param_names"] == opt.state_dict()["param_groups"][0]["param_names"]

    def test_ema_reads_the_masters_and_release_gives_fp32_weights_back():
        model = tiny_model()
        opt = build_optimizer(model, 1e-2, 0.1, master_weights=True)
        ema = EMA(opt.master_tensors(), decay=0.5, warmup=False)
        train(model, opt, 2)
        ema.update(opt.master_tensors())
        masters = opt.master_tensors()
        assert all(s.dtype == torch.float32 for s in ema.shadow.values())
        w = "blocks.0.att.key.weight"
        assert not torch.equal(ema.shadow[w], ema.shadow[w].bfloat16().float())  # averaged from fp32, not bf16
        with ema.swapped(model):
            assert model.blocks[0].att.key.weight.dtype == torch.bfloat16
        opt.release()
        for n, p in model.named_parameters():
            assert p.dtype == torch.float32 and torch.equal(p.detach(), masters[n]), n
        lm_loss(model, torch.zeros(1, 4, dtype=torch.long))  # runs as a plain fp32 model

    def test_bad_input_is_one_line():
        model = tiny_model().bfloat16()
        with pytest.raises(DiffRwkvError, match=r"master weights: parameter '.*' is torch.bfloat16, not fp32"):
            build_optimizer(model, 1e-2, master_weights=True)
        model = tiny_model()
        opt = build_optimizer(model, 1e-2, master_weights=True)
        with pytest.raises(DiffRwkvError, match=r"master weights: parameters cannot join after the optimizer is built"):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
        with pytest.raises(DiffRwkvError, match=r"master weights: step\(closure\) is not supported"):
            opt.step(lambda: 0.0)

    def _ptx_accesses(low: bool, aligned: bool) -> dict[str, int]:
        """The global loads and stores, by width, in the update kernel's PTX for an H100 (compiled on the CPU: Triton
        builds PTX without a GPU)."""
        import re
        from collections import Counter

        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from rwkv_diffusion_rnn import master_weights as mw

        fn = mw._adamw_kernel
        consts = {"BLOCK": mw.BLOCK, "LOW": low, "GRAD_ALIGNED": aligned}
        floats = {"p_ptr": "*fp32", "m_ptr": "*fp32", "v_ptr": "*fp32", "low_ptr": "*bf16", "steps_ptr": "*fp32",
                  "scale_ptr": "*fp32", "found_ptr": "*fp32"}  # fmt: skip
        sig = {n: "constexpr" if n in consts else floats.get(n, "*i64" if n.endswith("_ptr") else "fp32")
               for n in fn.arg_names}  # fmt: skip
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n.endswith("_ptr")}
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": mw.NUM_WARPS}).asm["ptx"]
        return Counter(re.findall(r"(?:ld|st)\.global[\w.]*", ptx))

    @pytest.mark.parametrize("low", [False, True], ids=["fp32", "bf16 copies"])
    def test_the_update_moves_16_bytes_a_thread_where_sizes_and_gradients_allow(low):
        """With every gradient 16-byte aligned and every size a multiple of 16 elements, the weights, moments,
        gradients and bf16 copies go as 16-byte vectors (the scalar accesses left are the tables); without, the same
        kernel's accesses are scalar (an H100 had the bf16-copy update at ~1.8 TB/s that way, 2026-12-07)."""
        pytest.importorskip("triton")
        fast, slow = _ptx_accesses(low, True), _ptx_accesses(low, False)
        per_thread = MW_BLOCK // (32 * MW_WARPS)  # elements a thread: 8
        vectors = per_thread // 4  # 16-byte fp32 vectors an array
        assert fast["ld.global.v4.b32"] == (3 if low else 4) * vectors + (1 if low else 0) * (per_thread // 8), fast
        assert fast["st.global.v4.b32"] == 3 * vectors + (1 if low else 0) * (per_thread // 8), fast
        assert fast["ld.global.b16"] == fast["st.global.b16"] == 0, fast
        assert slow["ld.global.v4.b32"] < fast["ld.global.v4.b32"], slow

    def test_the_vector_hint_needs_every_size_a_multiple_of_16():
        """The kernel is told the sizes are multiples of 16 only when they are: one odd size turns it off."""
        from rwkv_diffusion_rnn.master_weights import MasterAdamW

        for shapes, want in (([(64, 32), (16,)], True), ([(64, 32), (5,)], False)):
            ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
            names = [f"t{i}" for i in range(len(ps))]
            opt = MasterAdamW([{"params": ps, "param_names": names, "weight_decay": 0.0}], [], lr=1e-3, kernel=True)
            for p in ps:
                p.grad = torch.randn_like(p)
            segs = [seg for group in opt.segments for seg in group if seg.params]
            assert len(segs) == 1
            opt._grad_table(segs[0], [p.grad for p in segs[0].params])
            assert segs[0].grads_aligned is want, shapes

    def test_the_kernel_matches_the_torch_path_in_the_interpreter():
        pytest.importorskip("triton")
        from tests.triton_interpreter import run_interpreted

        res = run_interpreted(__file__)
        ref, ker = res["False"], res["True"]
        assert len(res["norms"]) == 3
        for got, want in res["norms"]:  # the one-launch norm against torch's over the same gradients
            assert abs(got - want) <= 1e-6 * want, res["norms"]
        assert ker["steps"] == ref["steps"] == {"a.weight": 2.0, "b": 2.0, "c.weight": 2.0, "d": 1.0}
        assert ker["dtypes"] == {"a.weight": "torch.bfloat16", "b": "torch.float32", "c.weight": "torch.bfloat16",
                                 "d": "torch.float32"}  # fmt: skip
        for n in ref["masters"]:
            for key in ("masters", "moments"):
                a, b = torch.tensor(ker[key][n]), torch.tensor(ref[key][n])
                assert float((a - b).abs().max()) <= 1e-6 * float(b.abs().max()), (n, key)
            # the interpreter's fp32 -> bf16 cast truncates: within one bf16 step of the rounded copy
            a, b = torch.tensor(ker["copies"][n]), torch.tensor(ref["copies"][n])
            assert float(((a - b).abs() / b.abs().clamp_min(1e-30)).max()) <= 2.0**-7, n
