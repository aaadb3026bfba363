"""Ops that can reorder or mix channels on a folded axis make their group unfoldable.

Torch-Pruning's dependency graph treats every op it does not know as element-wise, so a flip,
roll, index_select, gather, sort, scatter, a transpose into the channel axis or a custom autograd
Function between two layers used to be folded as if it kept channel identity: planted exact
duplicates then folded into a wrong model, silently. Each such op must either fold exactly or
leave its group whole, marked unsafe with a reason naming the op and the modules around it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

import modelfold as mf
from helpers import plant_duplicates
from modelfold.graph import discover_groups

HIDDEN = 8
# channel DST[i] is planted as an exact copy of channel SRC[i]; pairs that a reversal or a shift
# of the channel axis does not map onto each other
SRC, DST = [0, 1, 2, 3], [5, 7, 4, 6]
PERM = torch.tensor([3, 0, 6, 1, 7, 2, 5, 4])
INV = torch.argsort(PERM)


class Shuffle(torch.autograd.Function):
    """A custom autograd Function that permutes the last axis (opaque to any graph)."""

    @staticmethod
    def forward(ctx, x):
        return x[..., PERM]

    @staticmethod
    def backward(ctx, grad):
        return grad[..., INV]


def _scatter(h):
    return torch.zeros_like(h).scatter(-1, PERM.expand_as(h), h)


# op applied on the hidden channels (last axis) -> the grad_fn name it leaves in the graph
CHANNEL_OPS = {
    "flip": (lambda h: h.flip(-1), "FlipBackward0"),
    "roll": (lambda h: h.roll(3, -1), "RollBackward0"),
    "index_select": (lambda h: h.index_select(-1, PERM), "IndexSelectBackward0"),
    "gather": (lambda h: h.gather(-1, PERM.expand_as(h)), "GatherBackward0"),
    "sort": (lambda h: h.sort(-1).values, "SortBackward0"),
    "scatter": (_scatter, "ScatterBackward"),
    "custom_function": (Shuffle.apply, "ShuffleBackward"),
}


class Between(nn.Module):
    """fc1 -> relu -> op -> fc2: the hidden channels are the only foldable group."""

    def __init__(self, op, d_in: int = 6, d_out: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, d_out)
        self.op = op

    def forward(self, x):
        return self.fc2(self.op(torch.relu(self.fc1(x))))


@torch.no_grad()
def plant_pairs(fc1: nn.Linear, fc2: nn.Linear) -> None:
    """Exact duplicate neurons: fc1 rows and fc2 columns DST copy SRC."""
    fc1.weight[DST] = fc1.weight[SRC]
    fc1.bias[DST] = fc1.bias[SRC]
    fc2.weight[:, DST] = fc2.weight[:, SRC]


def make_between(op, d_in: int = 6, seed: int = 0) -> Between:
    torch.manual_seed(seed)
    model = Between(op, d_in).eval()
    plant_pairs(model.fc1, model.fc2)
    return model


def fold_and_check(model: nn.Module, x: torch.Tensor, group: str = "fc1"):
    """Fold at ratio 0.5: the group either folds exactly or is reported unsafe and kept whole.

    Returns (status, reason) of `group`."""
    with torch.no_grad():
        dense = model(x)
    folded = mf.fold(model, x, ratio=0.5)
    with torch.no_grad():
        err = (folded(x) - dense).abs().max().item()
    info = {g.name: g for g in mf.summary(model, folded, x).groups}[group]
    if info.status == "folded":
        assert info.k < info.n
        assert err < 1e-5, f"group {group!r} folded with error {err}"
    else:
        assert info.status == "unsafe", info.status
        assert info.k == info.n
        assert err < 1e-6  # the only foldable group was left whole: the dense model
    return info.status, info.reason


@pytest.mark.parametrize("name", sorted(CHANNEL_OPS))
def test_channel_reordering_op_makes_its_group_unsafe(name):
    op, grad_fn = CHANNEL_OPS[name]
    model = make_between(op)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    status, reason = fold_and_check(model, x)
    assert status == "unsafe"
    assert grad_fn in reason and "'fc1'" in reason and "'fc2'" in reason


@pytest.mark.parametrize("name", sorted(CHANNEL_OPS))
def test_the_dependency_graph_itself_refuses_the_group(name):
    """The graph check is the mechanism: the group is unsafe before anything is merged."""
    op, grad_fn = CHANNEL_OPS[name]
    model = make_between(op)
    groups = {g.name: g for g in discover_groups(model, torch.randn(2, 6)).groups}
    assert not groups["fc1"].foldable
    assert grad_fn in groups["fc1"].unsafe


def test_summary_lists_the_unsafe_group_with_its_reason():
    model = make_between(lambda h: h.flip(-1))
    x = torch.randn(4, 6)
    folded = mf.fold(model, x, ratio=0.5)
    s = mf.summary(model, folded, x)
    (info,) = [g for g in s.groups if g.name == "fc1"]
    assert info.status == "unsafe" and "FlipBackward0" in info.reason
    text = str(s)
    assert "fc1" in text and "unsafe" in text and "FlipBackward0" in text


@mf.register_factory  # so that mf.load may rebuild the architecture
def build_between(op: str, seed: int = 0) -> Between:
    return make_between(CHANNEL_OPS[op][0], seed=seed)


def test_unsafe_reason_survives_save_and_load(tmp_path):
    model = build_between("roll")
    x = torch.randn(4, 6)
    folded = mf.fold(model, x, ratio=0.5)
    mf.save(folded, tmp_path / "m", factory=build_between, factory_kwargs={"op": "roll"})
    loaded = mf.load(tmp_path / "m")
    (info,) = [g for g in mf.summary(None, loaded, x).groups if g.name == "fc1"]
    assert info.status == "unsafe" and "RollBackward0" in info.reason


def test_transpose_into_the_channel_axis_is_unsafe():
    """tokens == channels, so Torch-Pruning couples fc1's outputs with fc2's inputs although
    fc2 reads the token axis after the transpose."""
    model = make_between(lambda h: h.transpose(1, 2), d_in=6)
    x = torch.randn(2, HIDDEN, 6)
    status, reason = fold_and_check(model, x)
    assert status == "unsafe"
    assert "TransposeBackward0" in reason and "'fc2'" in reason


NON_CHANNEL_OPS = {
    "flip_tokens": lambda h: h.flip(1),
    "roll_tokens": lambda h: h.roll(2, 1),
    "index_select_tokens": lambda h: h.index_select(1, torch.tensor([4, 0, 2, 1, 3])),
    "sort_tokens": lambda h: h.sort(1).values,
    "cumsum_tokens": lambda h: h.cumsum(1),
    "softmax_tokens": lambda h: h.softmax(1),
    "transpose_and_back": lambda h: h.transpose(1, 2).flip(-1).transpose(1, 2),
    "permute_and_back": lambda h: h.permute(2, 0, 1).flip(1).permute(1, 2, 0),
    "unsqueeze_flip": lambda h: h.unsqueeze(1).flip(2).squeeze(1),
}


@pytest.mark.parametrize("name", sorted(NON_CHANNEL_OPS))
def test_reordering_another_axis_still_folds_exactly(name):
    model = make_between(NON_CHANNEL_OPS[name])
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(2))
    status, _ = fold_and_check(model, x)
    assert status == "folded"


class ConvNet(nn.Module):
    """Two conv layers with spatial reorderings and element-wise ops between them."""

    def __init__(self, op):
        super().__init__()
        self.conv1 = nn.Conv2d(3, HIDDEN, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(HIDDEN)
        self.conv2 = nn.Conv2d(HIDDEN, HIDDEN, 3, padding=1)
        self.fc = nn.Linear(HIDDEN, 4)
        self.op = op

    def forward(self, x):
        h = self.op(torch.relu(self.bn1(self.conv1(x))))
        h = F.max_pool2d(torch.relu(self.conv2(h)), 2)
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


SPATIAL_OPS = {
    "flip_w": lambda h: h.flip(-1),
    "flip_hw": lambda h: h.flip((2, 3)),
    "roll_h": lambda h: h.roll(1, 2),
    "transpose_hw": lambda h: h.transpose(-1, -2),
    "index_select_w": lambda h: h.index_select(3, torch.tensor([3, 2, 1, 0, 4, 5])),
    "elementwise": lambda h: (torch.sigmoid(h) * 2.0 + 1.0 - h.tanh() / 3.0).neg()
    + F.gelu(h) + F.silu(h) + F.hardtanh(h) + F.dropout(h.clone(), 0.1, training=False)
    + h.to(torch.float64).to(torch.float32),
    "residual_pool": lambda h: h + F.avg_pool2d(h, 3, stride=1, padding=1),
}


@pytest.mark.parametrize("name", sorted(SPATIAL_OPS))
def test_spatial_and_elementwise_ops_fold_duplicates_losslessly(name):
    torch.manual_seed(0)
    model = ConvNet(SPATIAL_OPS[name]).eval()
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    assert plant_duplicates(model, x) == 2  # conv1 and conv2 groups
    assert fold_and_check(model, x, "conv1")[0] == "folded"
    assert fold_and_check(model, x, "conv2")[0] == "folded"


def test_channel_flip_in_a_conv_net_is_unsafe():
    """dims=(1,) of an NCHW map is the channel axis."""
    torch.manual_seed(0)
    model = ConvNet(lambda h: h.flip(1)).eval()
    x = torch.randn(2, 3, 6, 6)
    groups = {g.name: g for g in discover_groups(model, x).groups}
    assert "FlipBackward0" in groups["conv1"].unsafe
    assert groups["conv2"].foldable


def test_the_end_of_fold_output_check_is_not_what_catches_them(monkeypatch):
    """With the folded model's output check switched off, every op is still refused."""
    import modelfold.graph_fold

    monkeypatch.setattr(modelfold.graph_fold, "check_output", lambda *args: None)
    x = torch.randn(4, 6)
    for name, (op, _) in CHANNEL_OPS.items():
        model = make_between(op)
        folded = mf.fold(model, x, ratio=0.5)
        assert folded.fc1.out_features == HIDDEN, name
        assert torch.equal(folded(x), model(x)), name


# op on a (2, 4, 5, 6) tensor whose channels are on axis -3 -> channel axis after it (None: the
# op is refused)
_X = (2, 4, 5, 6)
_IDX = torch.tensor([1, 0, 2, 3, 5, 4])
THROUGH = {
    "flip_w": (lambda x: x.flip(-1), -3),
    "flip_c": (lambda x: x.flip(1), None),
    "flip_c_negative": (lambda x: x.flip(-3), None),
    "roll_flat": (lambda x: x.roll(1), None),
    "roll_h": (lambda x: x.roll(1, 2), -3),
    "gap": (lambda x: x.mean((2, 3)), -1),
    "gap_keepdim": (lambda x: x.mean((-1, -2), keepdim=True), -3),
    "mean_c": (lambda x: x.mean(1), None),
    "mean_all": (lambda x: x.mean(), None),
    "sum_w": (lambda x: x.sum(-1), -2),
    "sum_batch": (lambda x: x.sum(0), -3),
    "amax_w": (lambda x: x.amax(-1), -2),
    "max_w": (lambda x: x.max(-1).values, -2),
    "max_all": (lambda x: x.max(), None),
    "norm_c": (lambda x: x.norm(dim=1), None),
    "std_w": (lambda x: x.std(-1), -2),
    "softmax_c": (lambda x: x.softmax(1), None),
    "softmax_w": (lambda x: x.softmax(-1), -3),
    "cumsum_h": (lambda x: x.cumsum(2), -3),
    "gather_w": (lambda x: x.gather(-1, _IDX.expand(*_X)), -3),
    "gather_c": (lambda x: x.gather(1, torch.zeros(*_X, dtype=torch.long)), None),
    "index_select_w": (lambda x: x.index_select(3, _IDX), -3),
    "permute_to_last": (lambda x: x.permute(0, 2, 3, 1), -1),
    "transpose_c_w": (lambda x: x.transpose(1, 3), -1),
    "transpose_h_w": (lambda x: x.transpose(2, 3), -3),
    "unsqueeze_front": (lambda x: x.unsqueeze(0), -3),
    "unsqueeze_back": (lambda x: x.unsqueeze(-1), -4),
    "stack_front": (lambda x: torch.stack([x, x]), -3),
    "stack_back": (lambda x: torch.stack([x, x], -1), -4),
    "select_h": (lambda x: x[:, :, 0], -2),
    "select_c": (lambda x: x[:, 0], None),
    "repeat_h": (lambda x: x.repeat(1, 1, 2, 1), -3),
    "repeat_new_dim": (lambda x: x.repeat(3, 1, 1, 1, 1), -3),
    "repeat_c": (lambda x: x.repeat(1, 2, 1, 1), None),
    "pad_w": (lambda x: F.pad(x, (1, 1)), -3),
    "pad_c": (lambda x: F.pad(x, (0, 0, 0, 0, 1, 1)), None),
    "reflect_pad": (lambda x: F.pad(x, (1, 1, 1, 1), mode="reflect"), -3),
    "upsample": (lambda x: F.interpolate(x, scale_factor=2), -3),
    "max_pool": (lambda x: F.max_pool2d(x, 2), -3),
    "adaptive_max_pool": (lambda x: F.adaptive_max_pool2d(x, 1), -3),
    "relu": (torch.relu, -3),
    "scale": (lambda x: x * torch.rand(6) + 1.0, -3),
    "advanced_index": (lambda x: x[:, [1, 0, 2, 3]], None),
    "pixel_shuffle": (lambda x: F.pixel_shuffle(x, 2), None),
    "bmm": (lambda x: x @ x.transpose(-1, -2), None),
    "layer_norm_functional": (lambda x: F.layer_norm(x, (6,)), None),
}


@pytest.mark.parametrize("name", sorted(THROUGH))
def test_channel_axis_through_one_op(name):
    from modelfold.graph.channel_ops import through

    op, expected = THROUGH[name]
    x = torch.randn(*_X, requires_grad=True)
    step = through(op(x).grad_fn, tp.ops.OPTYPE.ELEMENTWISE, -3)
    assert step.ok == (expected is not None), step.why
    if expected is not None:
        assert step.axis == expected
    else:
        assert step.why


@pytest.mark.parametrize("op", [lambda x: x.flip(-1), lambda x: x.softmax(1),
                                lambda x: x.amax(-1), lambda x: x[:, 0]])
def test_an_op_along_dims_is_refused_where_the_channel_axis_is_unknown(op):
    from modelfold.graph.channel_ops import through

    x = torch.randn(*_X, requires_grad=True)
    step = through(op(x).grad_fn, tp.ops.OPTYPE.ELEMENTWISE, None)
    assert not step.ok and "not known" in step.why


def test_pointwise_ops_and_size_one_dims_pass_an_unknown_channel_axis_on():
    from modelfold.graph.channel_ops import through

    x = torch.randn(*_X, requires_grad=True)
    for y in (x.relu(), x.unsqueeze(0), x[:, :, :1].squeeze(2), x * 2, torch.stack([x, x])):
        step = through(y.grad_fn, tp.ops.OPTYPE.ELEMENTWISE, None)
        assert step.ok and step.axis is None


class ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle: view -> transpose -> view permutes the channels."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, HIDDEN, 3, padding=1)
        self.conv2 = nn.Conv2d(HIDDEN, 4, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        b, c, height, width = h.shape
        h = h.view(b, 2, c // 2, height, width).transpose(1, 2).reshape(b, c, height, width)
        return self.conv2(h).mean((2, 3))


def test_channel_shuffle_is_unsafe():
    torch.manual_seed(0)
    model = ChannelShuffle().eval()
    x = torch.randn(2, 3, 6, 6)
    groups = {g.name: g for g in discover_groups(model, x).groups}
    assert "TransposeBackward0" in groups["conv1"].unsafe
    assert "'conv1'" in groups["conv1"].unsafe
    with torch.no_grad():
        model.conv1.weight[DST] = model.conv1.weight[SRC]
        model.conv1.bias[DST] = model.conv1.bias[SRC]
    status, _ = fold_and_check(model, x, "conv1")
    assert status == "unsafe"


class FlippedLinear(nn.Linear):
    """The dependency graph sees a Linear; its forward reverses the output features."""

    def forward(self, x):
        return super().forward(x).flip(-1)


class PlainSubclassLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 1.0


def test_a_layer_subclass_reordering_its_output_is_unsafe():
    torch.manual_seed(0)
    model = nn.Sequential(FlippedLinear(6, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 3)).eval()
    plant_pairs(model[0], model[2])
    x = torch.randn(4, 6)
    status, reason = fold_and_check(model, x, "0")
    assert status == "unsafe"
    assert "'0'" in reason and "FlippedLinear" in reason and "FlipBackward0" in reason


@pytest.mark.parametrize("shape", [(4, 6), (2, 5, 6)])
def test_a_layer_subclass_running_plain_layer_ops_still_folds(shape):
    torch.manual_seed(0)
    model = nn.Sequential(PlainSubclassLinear(6, HIDDEN), nn.ReLU(),
                          PlainSubclassLinear(HIDDEN, 3)).eval()
    plant_pairs(model[0], model[2])
    status, _ = fold_and_check(model, torch.randn(*shape), "0")
    assert status == "folded"


def test_squeeze_after_global_pooling_keeps_the_channel_axis():
    from modelfold.graph.channel_ops import through

    x = torch.randn(*_X, requires_grad=True)
    pooled = F.adaptive_avg_pool2d(x, 1)
    step = through(pooled.squeeze().grad_fn, tp.ops.OPTYPE.ELEMENTWISE, -3)
    assert step.ok and step.axis == -1


def test_an_axis_that_does_not_fit_the_tensor_is_refused():
    from modelfold.graph.channel_ops import through

    x = torch.randn(3, 4, requires_grad=True)
    for y in (x.flip(-1), x.transpose(0, 1), x[:, 0], x.gather(-1, torch.zeros(3, 4).long())):
        step = through(y.grad_fn, tp.ops.OPTYPE.ELEMENTWISE, -3)
        assert not step.ok and "cannot be followed" in step.why
