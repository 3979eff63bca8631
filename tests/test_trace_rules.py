"""CUDA's device rules (`harness.trace.rules`): one table that the emulation applies to live
tensors and the classifier to recorded specs, with the same answers."""

from __future__ import annotations

import os

import pytest
import torch

from harness.trace import rules
from harness.trace.classify import refused
from harness.trace.emulated import EmulatedCuda
from harness.trace.events import Event, TensorSpec

SAME_DEVICE = "Expected all tensors to be on the same device"
aten = torch.ops.aten


def test_rule_of_takes_any_spelling_of_an_op():
    assert rules.rule_of("aten.index_put_.default") == rules.INDEX_PUT
    assert rules.rule_of("aten::add_.Tensor") == rules.CPU_SCALAR
    assert rules.rule_of("mm") == rules.SAME
    assert rules.rule_of("harness.my_op.default") == rules.SAME


def _spec(device, dtype, shape):
    shape = tuple(shape)
    return TensorSpec(device, dtype, shape, 4 * max(1, len(shape)))


def test_recorded_operands_take_their_names_from_the_schema():
    specs = [_spec("cuda:0", "float32", (5, 3)), _spec("cpu", "int64", (2,)), _spec("cpu", "bool", (5,))]
    ops = rules.recorded_operands("aten.index_put_.default", [specs[0], specs[1], specs[0]])
    # in place: self is written, then read; the list argument takes what the fixed ones leave
    assert [(o.name, o.out) for o in ops] == [
        ("self", True),
        ("self", False),
        ("indices", False),
        ("values", False),
    ]
    ops = rules.recorded_operands("aten.add.out", [specs[0], specs[0], specs[0]])
    assert [(o.name, o.out) for o in ops] == [("self", False), ("other", False), ("out", True)]
    ops = rules.recorded_operands("aten.index.Tensor", [specs[0], specs[1], specs[2]])
    assert [o.name for o in ops] == ["self", "indices", "indices"]
    # an op this torch does not know: names by position
    ops = rules.recorded_operands("nowhere.op.default", specs)
    assert [o.name for o in ops] == ["arg0", "arg1", "arg2"]


def test_refusal_gives_cuda_messages():
    cuda = rules.Operand("self", "cuda:0", "float32", (2, 2))
    cpu = rules.Operand("mat2", "cpu", "float32", (2, 2))
    message = rules.refusal("aten.mm.default", [cuda, cpu])
    assert message.startswith(SAME_DEVICE) and "mat2 is on cpu" in message and "wrapper_CUDA_mm" in message
    scalar = rules.Operand("other", "cpu", "float32", ())
    assert rules.refusal("aten.add.Tensor", [cuda, scalar]) is None  # a CPU scalar
    assert rules.refusal("aten.mm.default", [cuda, scalar._replace(name="mat2")]) is not None  # no exception
    assert rules.refusal("aten.zeros_like.default", [cuda, cpu], device_arg=True) is None
    assert rules.refusal("aten.mm.default", [cpu._replace(name="self"), cpu]) is None  # a CPU op


def test_fused_attention_backward_takes_its_rng_state_from_the_host():
    """Flash attention's forward on CUDA returns its dropout RNG state as 0-dim CPU tensors (no
    dropout, no graph capture), and its backward takes them: an H100 ran nn.Transformer's causal
    attention backward so, and the classifier had called it a mismatch. Any other operand on the
    host is still refused."""
    op = "aten._scaled_dot_product_flash_attention_backward.default"
    names = ("grad_out", "query", "key", "value", "out")
    on_device = [rules.Operand(n, "cuda:0", "float32", (1, 2, 4, 8)) for n in names]
    on_device.append(rules.Operand("logsumexp", "cuda:0", "float32", (1, 2, 4)))
    state = [rules.Operand(n, "cpu", "int64", ()) for n in ("philox_seed", "philox_offset")]
    assert rules.rule_of(op) == rules.RNG_STATE
    assert rules.refusal(op, on_device + state) is None
    host_query = [on_device[0], on_device[1]._replace(device="cpu"), *on_device[2:], *state]
    assert "query is on cpu" in rules.refusal(op, host_query)
    # A trace records no spec for the undefined cum_seq_q/k: the names after them shift.
    specs = [rules.Operand("", *o[1:4]) for o in on_device + state]
    recorded = rules.recorded_operands(op, specs)
    assert [o.name for o in recorded][-2:] == ["cum_seq_q", "cum_seq_k"]
    assert rules.refusal(op, recorded) is None
    assert rules.refusal(
        op, rules.recorded_operands(op, [specs[0], specs[1]._replace(device="cpu"), *specs[2:]])
    )


# (op, live arguments) calls, each judged on live tensors by the emulation and on their
# recorded specs by the classifier: the answers must be the same.
def _calls():
    def c(*shape, dtype=torch.float32):
        return torch.zeros(shape, dtype=dtype, device="cuda")

    def h(*shape, dtype=torch.float32):
        return torch.zeros(shape, dtype=dtype)

    long, boolean = torch.long, torch.bool
    return [
        (aten.mm.default, (c(2, 2), h(2, 2)), {}),
        (aten.mm.default, (c(2, 2), c(2, 2)), {}),
        (aten.add.Tensor, (c(2), h()), {}),
        (aten.add.Tensor, (h(), c(2)), {}),
        (aten.add.Tensor, (c(2), h(2)), {}),
        (aten.add_.Tensor, (h(), c(2)), {}),
        (aten.add.out, (c(2), c(2)), {"out": h()}),
        (aten.where.self, (h(2, dtype=boolean), c(2), h()), {}),
        (aten.where.self, (c(2, dtype=boolean), h(2), c(2)), {}),
        (aten.masked_fill.Tensor, (c(3), h(3, dtype=boolean), h()), {}),
        (aten.masked_fill.Tensor, (h(3), h(3, dtype=boolean), c()), {}),
        (aten.masked_fill.Tensor, (c(3), c(3, dtype=boolean), h()), {}),
        (aten.index.Tensor, (c(5, 3), [h(2, dtype=long)]), {}),
        (aten.index.Tensor, (h(5, 3), [c(2, dtype=long)]), {}),
        (aten.index_put_.default, (c(5), [h(2, dtype=long)], h(2)), {}),
        (aten.index_put_.default, (c(5), [c(5, dtype=boolean)], h(1)), {}),
        (aten.index_put_.default, (c(5), [h(2, dtype=long)], h()), {}),
        (aten.logical_and.default, (h(), c(2)), {}),
        (aten.logical_and.default, (c(2), h()), {}),
        (aten.fill_.Tensor, (c(3), h()), {}),
        (aten.index_fill_.int_Tensor, (c(3), 0, h(1, dtype=long), h()), {}),
        (aten.cat.default, ([c(2), h(2)],), {}),
        (aten.slice_scatter.default, (c(4), h(2), 0, 0, 2), {}),
        (aten._unsafe_masked_index.default, (c(4), c(2, dtype=boolean), [h(2, dtype=long)], 0.0), {}),
    ]


def test_the_emulation_and_the_classifier_judge_calls_alike():
    from harness.trace import emulated

    with EmulatedCuda():
        calls = _calls()
        answers = []
        for func, args, kwargs in calls:
            live = emulated.refusal(func, args, kwargs)
            flat = [a for x in (*args, *kwargs.values()) for a in (x if isinstance(x, list) else [x])]
            specs = [
                _spec(str(t.device), str(t.dtype)[6:], t.shape) for t in flat if isinstance(t, torch.Tensor)
            ]
            event = Event(0, 0, str(func).replace("::", "."), "m", None, None, None, specs)
            answers.append((str(func), live is not None, refused(event)))
    assert [a for a in answers if a[1] != a[2]] == []
    refusals = sum(a[1] for a in answers)
    assert 8 <= refusals <= len(answers) - 8  # both kinds of answer are exercised


def test_cpu_scalar_ops_are_nocheck_in_native_functions():
    """The ops the table lets take a 0-dim CPU scalar skip the generated device check."""
    yaml = pytest.importorskip("yaml")
    torchgen = pytest.importorskip("torchgen")
    path = os.path.join(
        os.path.dirname(torchgen.__file__), "packaged", "ATen", "native", "native_functions.yaml"
    )
    if not os.path.exists(path):
        pytest.skip("torchgen's native_functions.yaml is not installed")
    with open(path) as f:
        entries = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    checked, kernels = {}, {}
    for e in entries:
        name, _, overload = e["func"].split("(")[0].partition(".")
        if "Scalar" not in overload:  # Scalar overloads have one tensor (and composite kernels)
            checked.setdefault(name, set()).add(e.get("device_check", "ExactSame"))
            kernels.setdefault(name, set()).update(
                k.strip() for k in (e.get("dispatch") or {}) for k in k.split(",")
            )
    composites = set(rules._CPU_SCALAR_COMPOSITES)
    scalar_ops = [op for op, rule in rules.RULES.items() if rule == rules.CPU_SCALAR and op in checked]
    assert len(scalar_ops) > 30
    strict = [op for op in scalar_ops if checked[op] != {"NoCheck"} and op not in composites]
    assert strict == []
    # The composites have no kernel of their own that a device check could wrap.
    for op in composites:
        assert kernels[op] and all(k.startswith("Composite") for k in kernels[op]), (op, kernels[op])


@pytest.mark.parametrize(
    "message, device_error",
    [
        # Real CUDA's messages, seen on an H100 (torch 2.11) by the module-database sweep.
        ("Input type (torch.cuda.FloatTensor) and weight type (torch.FloatTensor) should be the same", True),
        (
            "Input type (torch.FloatTensor) and bias type (torch.cuda.FloatTensor) should be the same or ...",
            True,
        ),
        ("iter.device(arg).is_cuda() INTERNAL ASSERT FAILED at aten/src/ATen/native/cuda/Loops.cuh", True),
        ("Could not run 'aten::slow_conv3d_forward' with arguments from the 'CUDA' backend.", True),
        # The same legacy message for dtypes on one device is not about devices.
        (
            "Input type (torch.cuda.HalfTensor) and weight type (torch.cuda.FloatTensor) should be the same",
            False,
        ),
        ("Input type (torch.FloatTensor) and weight type (torch.HalfTensor) should be the same", False),
        ("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)", False),
    ],
)
def test_device_errors_are_told_from_other_errors(message, device_error):
    from harness.trace.classify import is_device_error
    from harness.trace.conformance import is_refusal

    assert is_device_error(message) is device_error
    assert is_refusal(RuntimeError(message)) is device_error
