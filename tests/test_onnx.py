"""ONNX export and torch.export: standard operators only, onnxruntime agrees with PyTorch."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import groupnorm
from groupnorm.export import decomposed_normalize, is_exporting
from groupnorm.kernels import Call

onnx = pytest.importorskip("onnx", reason="needs onnx: pip install 'groupnorm[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime: pip install 'groupnorm[onnx]'")
pytest.importorskip("onnxscript", reason="the default (dynamo) ONNX exporter needs onnxscript")


class Layers(nn.Module):
    """Every layer kind side by side (fused activations, a residual, WS conv), one level deep."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.ws = groupnorm.WSConv2d(16, 8, 3, padding=1)
        self.norms = nn.ModuleList(
            [
                groupnorm.GroupNorm(4, 16),
                groupnorm.GroupNormAct(4, 16, activation="silu"),
                groupnorm.GroupNormAct(8, 16, activation="gelu"),
                groupnorm.GroupNormAct(None, 16, group_size=8, activation="relu"),
                groupnorm.BatchNorm(16, activation="relu"),
                groupnorm.LayerNorm(16),
                groupnorm.InstanceNorm(16),
            ]
        )
        self.res = groupnorm.GroupNormAct(2, 16, activation="silu")
        self.ws_norm = groupnorm.GroupNorm(2, 8)

    def forward(self, x):
        outs = [norm(x) for norm in self.norms]
        # Convolutions see a normalized input: a conv of an input with a large mean cancels
        # terms of size 20 * |w| and loses digits in any runtime, which is not what we test.
        # A conv's float32 error grows with its fan-in; a norm after it (as in real models)
        # divides that by the output's std.
        h = outs[0]
        outs.append(self.res(self.conv(h), residual=h))  # silu(gn(conv(h) + h))
        outs.append(self.ws_norm(self.ws(h)))
        return torch.cat(outs, dim=1)


class Net(nn.Module):
    """A deeper stack: stem, norms with activations, a residual, norms of every kind."""

    def __init__(self):
        super().__init__()
        self.stem = groupnorm.WSConv2d(16, 16, 3, padding=1)
        self.gn_silu = groupnorm.GroupNormAct(4, 16, activation="silu")
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.gn_res = groupnorm.GroupNorm(None, 16, group_size=2)
        self.bn_silu = groupnorm.BatchNorm(16, activation="silu")
        self.ln = groupnorm.LayerNorm(16)
        self.inorm = groupnorm.InstanceNorm(16)
        self.gn_gelu = groupnorm.GroupNormAct(8, 16, activation="gelu")

    def forward(self, x):
        h = self.gn_silu(self.stem(x))
        h = self.gn_res(self.conv(h), residual=h)  # norm(conv(h) + h)
        # (No ReLU right before instance norm: a channel it zeroes has variance 0, and IN then
        # scales float32 rounding noise by 1/sqrt(eps).)
        return self.gn_gelu(self.inorm(self.ln(self.bn_silu(h))))


def randomized(net):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.5)
        for m in net.modules():
            if isinstance(m, groupnorm.BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def check_standard_ops(model_proto):
    graph = model_proto.graph
    domains = {n.domain for n in graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    assert not model_proto.functions  # no local functions standing in for a custom op
    return {n.op_type for n in graph.node}


def run_ort(model_bytes, x):
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def export_default(net, opset):
    batch = torch.export.Dim("batch", min=1, max=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            net,
            (torch.randn(2, 16, 8, 8),),
            opset_version=opset,
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
    ops = check_standard_ops(program.model_proto)
    # Group norm goes through InstanceNormalization at every opset (see groupnorm/export.py).
    assert "InstanceNormalization" in ops and "GroupNormalization" not in ops
    return program.model_proto.SerializeToString()


@pytest.mark.parametrize("opset", [18, 21])
def test_default_exporter_every_layer_within_1e5_with_dynamic_batch(opset):
    net = randomized(Layers())
    data = export_default(net, opset)
    for n, shift in ((1, 0.5), (2, 0.5), (5, 20.0)):  # shift: far-from-zero means stay exact
        x = torch.randn(n, 16, 8, 8) * 2 + shift
        with torch.no_grad():
            want = net(x)
        torch.testing.assert_close(run_ort(data, x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("opset", [18, 21])
def test_default_exporter_deep_net_as_close_as_torch_itself(opset):
    """Through 8 stacked layers float32 rounding adds up in both runtimes: allow 2x torch's own
    float32 error against float64, plus 1e-5."""
    net = randomized(Net())
    data = export_default(net, opset)
    x = torch.randn(3, 16, 8, 8) * 2 + 0.5
    with torch.no_grad():
        want = net(x)
        want64 = copy.deepcopy(net).double()(x.double())
    torch_err = (want.double() - want64).abs().max().item()
    err = (run_ort(data, x).double() - want64).abs().max().item()
    assert err <= 2 * torch_err + 1e-5, (err, torch_err)


def test_legacy_torchscript_exporter():
    net = randomized(Net())
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (torch.randn(2, 16, 8, 8),),
            buf,
            dynamo=False,
            opset_version=18,
            input_names=["x"],
            dynamic_axes={"x": {0: "batch"}},
        )
    check_standard_ops(onnx.load_from_string(buf.getvalue()))
    x = torch.randn(3, 16, 8, 8)
    with torch.no_grad():
        want = net(x)
    torch.testing.assert_close(run_ort(buf.getvalue(), x), want, atol=1e-4, rtol=1e-4)


def test_torch_export_has_no_custom_op_and_matches():
    net = randomized(Net())
    x = torch.randn(2, 16, 8, 8)
    ep = torch.export.export(net, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("groupnorm" in t for t in targets), targets
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), net(x), atol=1e-5, rtol=1e-5)
    assert not is_exporting()


@pytest.mark.parametrize("mode", ["group", "layer", "instance", "batch"])
@pytest.mark.parametrize("activation", ["", "silu", "gelu"])
def test_decomposed_path_matches_float64_reference(mode, activation):
    """The export path on its own, including batch norm in training (running stats updated)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 5, 3, generator=g) * 2 + 0.5
    res = torch.randn(4, 6, 5, 3, generator=g)
    w, b = torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
    groups = {"group": 3, "layer": 1, "instance": 6, "batch": 6}[mode]
    rm, rv = torch.randn(6, generator=g), torch.rand(6, generator=g) + 0.5
    rm_ours, rv_ours = rm.clone(), rv.clone()
    y, total = decomposed_normalize(
        Call(
            x,
            w,
            b,
            res,
            None,
            None,
            groups,
            mode == "batch",
            1e-5,
            activation,
            running_update=(rm, rv, 0.1) if mode == "batch" else None,
        )
    )
    kw = {"num_groups": groups} if mode == "group" else {}
    ref = groupnorm.reference_norm(
        x, mode, weight=w, bias=b, residual=res, activation=activation, **kw
    )
    torch.testing.assert_close(y.double(), ref.output, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(total, x + res)
    if mode == "batch":  # same update as the eager op
        groupnorm.normalize(
            x,
            "batch",
            residual=res,
            running_mean=rm_ours,
            running_var=rv_ours,
            momentum=0.1,
        )
        torch.testing.assert_close(rm, rm_ours)
        torch.testing.assert_close(rv, rv_ours)


def test_decomposed_path_low_precision_computes_in_float32():
    x = torch.randn(2, 8, 6, 6) * 3 + 2
    y, _ = decomposed_normalize(
        Call(x.bfloat16(), None, None, None, None, None, 4, False, 1e-5, "silu")
    )
    ref = groupnorm.reference_norm(x.bfloat16(), "group", num_groups=4, activation="silu")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), ref.output, atol=3e-2, rtol=1e-2)
