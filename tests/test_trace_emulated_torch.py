"""The emulated CUDA device runs third-party torch code: training steps (forward, backward and an
optimizer), torch.nn's attention, transformer, convolution and recurrent layers, custom ops and
`__torch_function__` overrides, with the values the CPU gives and CUDA's device errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from harness.errors import EmulationUnsupported, HarnessError
from harness.trace import Tracer
from harness.trace.emulated import EmulatedCuda, EmulatedTensor

C0 = torch.device("cuda", 0)
SAME_DEVICE = "Expected all tensors to be on the same device"


def _models():
    torch.manual_seed(0)
    return {
        "mlp": (
            torch.nn.Sequential(
                torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3)
            ),
            torch.randn(5, 4),
        ),
        "conv": (
            torch.nn.Sequential(
                torch.nn.Conv2d(3, 4, 3, padding=1),
                torch.nn.BatchNorm2d(4),
                torch.nn.ReLU(),
                torch.nn.MaxPool2d(2),
                torch.nn.Flatten(),
                torch.nn.Linear(16, 3),
            ),
            torch.randn(2, 3, 4, 4),
        ),
        "attention": (torch.nn.MultiheadAttention(8, 2, batch_first=True), torch.randn(2, 5, 8)),
        "encoder": (
            torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
            torch.randn(2, 5, 8),
        ),
        "gru": (torch.nn.GRU(2, 3, num_layers=2, bidirectional=True), torch.randn(4, 2, 2)),
        "lstm": (torch.nn.LSTM(2, 3, batch_first=True), torch.randn(2, 4, 2)),
        "lstm_cell": (torch.nn.LSTMCell(2, 3), torch.randn(5, 2)),
        "gru_cell": (torch.nn.GRUCell(2, 3), torch.randn(5, 2)),
        "embedding_bag": (torch.nn.EmbeddingBag(10, 4), torch.randint(0, 10, (3, 4))),
    }


def _call(name, model, x):
    out = model(x, x, x) if name == "attention" else model(x)
    return out[0] if isinstance(out, tuple) else out


def _optimizer(name, params):
    # Adam's step is lr * sign(grad) for gradients that are rounding noise (some attention
    # biases): SGD with momentum for the layers that have them, AdamW (foreach on CUDA) elsewhere.
    if name in ("attention", "encoder"):
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return torch.optim.AdamW(params, lr=0.1)


@pytest.mark.parametrize("name", list(_models()))
def test_a_training_step_gives_the_cpu_values(name):
    model, x = _models()[name]
    ref = copy.deepcopy(model)
    opt_ref = _optimizer(name, ref.parameters())
    loss_ref = (_call(name, ref, x).float() ** 2).mean()
    loss_ref.backward()
    opt_ref.step()
    with EmulatedCuda():
        dev = copy.deepcopy(model).cuda()
        opt = _optimizer(name, dev.parameters())
        loss = (_call(name, dev, x.cuda()).float() ** 2).mean()
        assert loss.device == C0 and loss.grad_fn is not None
        loss.backward()
        for p in dev.parameters():
            assert isinstance(p.grad, EmulatedTensor) and p.grad.device == C0
        grads = [p.grad.cpu() for p in dev.parameters()]
        opt.step()
        params = [p.detach().cpu() for p in dev.parameters()]
        value = loss.item()
    assert value == pytest.approx(loss_ref.item(), rel=1e-5, abs=1e-6)
    for g, p in zip(grads, ref.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)
    for a, b in zip(params, ref.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("name", ["attention", "encoder", "lstm"])
def test_eval_fast_paths_run_in_every_grad_mode(name, mode):
    """nn.MultiheadAttention and TransformerEncoderLayer take their fused fast path in eval
    without grad (entered through handle_torch_function); the values are the CPU's."""
    model, x = _models()[name]
    model.eval()
    with getattr(torch, mode)():
        expected = _call(name, model, x)
        with EmulatedCuda():
            got = _call(name, copy.deepcopy(model).cuda(), x.cuda())
            assert got.device == C0
            got = got.cpu()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_device_errors_in_training_are_cudas():
    with EmulatedCuda():
        model = torch.nn.Linear(4, 2).cuda()
        with pytest.raises(RuntimeError, match=f"{SAME_DEVICE}.*mat1 is on cpu"):
            model(torch.randn(3, 4)).sum().backward()

        class WrongDevice(torch.autograd.Function):  # a backward that returns its grad on the CPU
            @staticmethod
            def forward(ctx, x):
                return x * 2

            @staticmethod
            def backward(ctx, grad):
                return grad.cpu() * 2

        x = torch.ones(3, device="cuda", requires_grad=True)
        with pytest.raises(
            RuntimeError, match="invalid gradient at index 0 - expected device cuda:0 but got cpu"
        ):
            WrongDevice.apply(x).sum().backward()


def test_autograd_grad_double_backward_hooks_and_retained_grads():
    x_cpu = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    with EmulatedCuda():
        x = x_cpu.detach().cuda().requires_grad_()
        y = (x**3).sum()
        (g,) = torch.autograd.grad(y, x, create_graph=True)
        assert g.device == C0 and g.cpu().tolist() == [3.0, 12.0, 27.0]
        (gg,) = torch.autograd.grad(g.sum(), x)
        assert gg.cpu().tolist() == [6.0, 12.0, 18.0]

        h = x * 2
        h.retain_grad()
        h.register_hook(lambda grad: grad * 10)
        (h**2).sum().backward()
        assert h.grad.cpu().tolist() == [40.0, 80.0, 120.0]  # retained after the hook ran
        assert x.grad.cpu().tolist() == [80.0, 160.0, 240.0]

        z = (x * x).sum()
        z.backward()
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            z.backward()

        model = torch.nn.Linear(3, 1).cuda()
        seen = []
        model.register_full_backward_pre_hook(lambda m, grad_out: (grad_out[0] * 2,))
        model.register_full_backward_hook(lambda m, grad_in, grad_out: seen.append((grad_in, grad_out)))
        x.grad = None
        model(x).sum().backward()
        (grad_in,), (grad_out,) = seen[0]  # the module's hooks ran, the pre-hook's gradient went on
        assert grad_out.device == C0 and grad_out.cpu().tolist() == [2.0]
        assert (
            x.grad.cpu().tolist() == (2 * model.weight.detach().cpu()[0]).tolist() == grad_in.cpu().tolist()
        )


def test_slicing_with_device_scalars_and_moves_under_inference_mode():
    with EmulatedCuda(device_count=2):
        x = torch.arange(10.0, device="cuda")
        n = torch.tensor(3, device="cuda")
        assert x[n:].cpu().tolist() == [3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
        assert x[1 : n + 2].cpu().tolist() == [1.0, 2.0, 3.0, 4.0]
        with torch.inference_mode():
            y = torch.ones(3).to("cuda", torch.float16)
            assert (y.device, y.dtype) == (C0, torch.float16)
            z = y.to(torch.device("cuda:1"), torch.float32, non_blocking=True)
            assert (z.device, z.dtype) == (torch.device("cuda", 1), torch.float32)


class _Int8Weight:
    """A tensor-like weight (no Tensor subclass) that overrides F.linear through __torch_function__."""

    def __init__(self, w):
        self.scale = w.abs().max() / 127
        self.q = torch.round(w / self.scale).to(torch.int8)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is not F.linear:
            return NotImplemented
        x, w = args[0], args[1]
        offset = torch.tensor([0.0], device=x.device)  # built from data inside the override
        return F.linear(x, w.q.to(x.dtype) * w.scale + offset)

    def to(self, device):
        self.q, self.scale = self.q.to(device), self.scale.to(device)
        return self


def test_torch_function_overrides_run_on_the_device():
    w = torch.randn(3, 4)
    x = torch.randn(2, 4)
    expected = F.linear(x, _Int8Weight(w))
    with EmulatedCuda():
        got = F.linear(x.cuda(), _Int8Weight(w).to("cuda"))
        assert got.device == C0
        with pytest.raises(EmulationUnsupported, match="as_subclass"):
            got.as_subclass(torch.nn.Parameter)
        torch.testing.assert_close(got.cpu(), expected)


def test_custom_ops_run_where_they_have_a_cpu_kernel_and_say_so_where_not():
    @torch.library.custom_op("harness_test::twice", mutates_args=())
    def twice(t: torch.Tensor) -> torch.Tensor:
        return t * 2

    @torch.library.custom_op("harness_test::cuda_only", mutates_args=(), device_types="cuda")
    def cuda_only(t: torch.Tensor) -> torch.Tensor:
        return t * 2

    with EmulatedCuda():
        out = twice(torch.ones(2, device="cuda"))
        assert out.device == C0 and out.cpu().tolist() == [2.0, 2.0]
        with pytest.raises(EmulationUnsupported, match="harness_test::cuda_only") as info:
            cuda_only(torch.ones(2, device="cuda"))
    assert isinstance(info.value, HarnessError)


def test_backward_ops_are_traced_on_the_device():
    with EmulatedCuda():
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).cuda()
        x = torch.randn(2, 4, device="cuda")
        with Tracer(model, placement=C0, keep_events=True) as tracer:
            model(x).sum().backward()
    ops = [e.op for e in tracer.events]
    assert "aten.threshold_backward.default" in ops and "aten.mm.default" in ops
    backward = [e for e in tracer.events if e.op == "aten.threshold_backward.default"]
    assert all(s.device == "cuda:0" for e in backward for s in e.inputs)
    assert tracer.summary.clean


def _tiny_transformers():
    transformers = pytest.importorskip("transformers")
    common = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return {
        "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)),
        "mixtral": lambda: transformers.MixtralForCausalLM(
            transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
        ),
    }


@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_transformers_models_train_and_generate(name):
    torch.manual_seed(0)
    model = _tiny_transformers()[name]().eval()
    ids = torch.randint(0, 64, (1, 7))
    ref = model(ids, labels=ids)
    ref.loss.backward()
    with EmulatedCuda():
        dev = copy.deepcopy(model).cuda()
        for p in dev.parameters():
            p.grad = None
        out = dev(ids.cuda(), labels=ids.cuda())
        out.loss.backward()
        logits = out.logits.cpu()
        grads = {n: p.grad.cpu() for n, p in dev.named_parameters() if p.grad is not None}
        with torch.inference_mode():
            generated = dev.generate(ids.cuda(), max_new_tokens=3, do_sample=False)
        assert generated.device == C0 and generated.shape == (1, 10)
    torch.testing.assert_close(logits, ref.logits, rtol=1e-4, atol=1e-4)
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == expected.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], expected[n], rtol=1e-4, atol=1e-4)


def test_a_parameter_rebuilt_from_its_own_type_stays_a_parameter_on_the_device():
    # accelerate's offload rebuilds parameters as type(param)(value, requires_grad=...)
    with EmulatedCuda():
        layer = torch.nn.Linear(3, 2).to("cuda")
        old = layer.weight
        rebuilt = type(old)(torch.ones(2, 3, device="cuda"), requires_grad=False)
        assert isinstance(rebuilt, EmulatedTensor) and isinstance(rebuilt, torch.nn.Parameter)
        assert str(rebuilt.device) == "cuda:0" and not rebuilt.requires_grad
        layer.weight = type(old)(rebuilt.detach() * 2, requires_grad=True)
        out = layer(torch.ones(1, 3, device="cuda"))
        assert out.device.type == "cuda" and out.cpu().tolist()[0][0] == pytest.approx(
            6 + layer.bias[0].item()
        )
