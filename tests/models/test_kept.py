"""models/kept.py: an operator marked kept runs once in a compiled graph's forward and never again in its backward,
where the partitioner under a memory budget would otherwise recompute it."""

import torch
import torch._functorch.config as functorch_config

from rwkv_diffusion_rnn.models.kept import kept

CALLS = []


@torch.library.custom_op("diffrwkv_test::kept_square", mutates_args=())
def square(x: torch.Tensor) -> torch.Tensor:
    CALLS.append(x.shape)
    return x * x


@square.register_fake
def _(x):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


# its backward needs x: saving x alone and squaring it again in the backward is the partitioner's cheapest plan
square.register_autograd(lambda ctx, g: 2 * ctx.saved_tensors[0] * g, setup_context=_setup)


def _loss(x, keep: bool):
    y = kept(square, x) if keep else square(x)
    return (y.sin() * y).sum()  # the backward needs y


def test_a_kept_operator_is_saved_not_recomputed():
    x0 = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    ref = x0.clone().requires_grad_()
    _loss(ref, False).backward()
    runs = {}
    try:
        with functorch_config.patch(activation_memory_budget=0.05):
            for keep in (False, True):
                torch._dynamo.reset()
                CALLS.clear()
                x = x0.clone().requires_grad_()
                loss = torch.compile(_loss, fullgraph=True)(x, keep)
                loss.backward()
                runs[keep] = len(CALLS)
                torch.testing.assert_close(loss, _loss(x0, False), rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(x.grad, ref.grad, rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()
    # unmarked, the partitioner drops y and runs the operator again in the backward; kept, it runs once
    assert runs == {False: 2, True: 1}, runs


def test_outside_a_compiled_graph_it_is_the_plain_call():
    x = torch.randn(5, generator=torch.Generator().manual_seed(1))
    CALLS.clear()
    torch.testing.assert_close(kept(square, x), x * x)
    assert len(CALLS) == 1
