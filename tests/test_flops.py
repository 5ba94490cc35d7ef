"""FLOP counting: fvcore's convention, the DynOPool handle, determinism, formatting."""
from __future__ import annotations

import logging
import warnings

import pytest
import timm
import torch
from torch import nn

from dynopool_convert import DynOPool
from dynopool_convert.errors import UserInputError
from dynopool_convert.flops import DYNOPOOL_FLOPS_PER_OUTPUT, count_flops, flops_by_module, format_flops


def test_resnet50_at_224_is_fvcores_4_11g():
    model = timm.create_model("resnet50", pretrained=False)
    model.train()
    n = count_flops(model, (3, 224, 224))
    assert n == 4_111_512_576  # fvcore's well-known figure for ResNet-50: 4.11G
    assert format_flops(n) == "4.11G"
    assert model.training  # mode restored


def test_conv_and_batchnorm_counts():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
    # conv: 8x8 positions * 8 out channels * 3*3*3 MACs; BN in eval: 2 per element
    assert count_flops(net, (3, 8, 8)) == 64 * 8 * 27 + 2 * 8 * 64


@pytest.mark.parametrize("kernel", [3, 4])
def test_same_padded_conv_counts_like_its_explicit_padding(kernel):
    # padding="same" runs as aten::_convolution_mode, which fvcore alone counts as 0
    explicit = nn.Sequential(nn.ZeroPad2d((1, 2, 1, 2)), nn.Conv2d(3, 8, 4)) if kernel == 4 else nn.Conv2d(3, 8, 3, padding=1)
    assert count_flops(nn.Conv2d(3, 8, kernel, padding="same"), (3, 8, 8)) == count_flops(explicit, (3, 8, 8)) == 64 * 8 * 3 * kernel**2


@pytest.mark.parametrize("aggregate", ["max", "mean"])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_dynopool_handle_counts_per_output_element(aggregate, backend):
    pool = DynOPool((1.7, 2.6), aggregate=aggregate, backend=backend)
    net = nn.Sequential(pool, nn.Conv2d(3, 4, 1))
    h, w = pool.output_size((30, 41))
    assert (h, w) == (18, 16)
    expected = DYNOPOOL_FLOPS_PER_OUTPUT * 3 * h * w + 4 * 3 * h * w
    assert count_flops(net, (3, 30, 41)) == expected
    by_module = flops_by_module(net, (3, 30, 41))
    assert by_module["0"] == DYNOPOOL_FLOPS_PER_OUTPUT * 3 * h * w
    assert by_module[""] == expected
    assert "forward" not in pool.__dict__  # the counting patch is removed afterwards
    x = torch.randn(1, 3, 30, 41)
    assert pool(x).shape == (1, 3, h, w)


def test_counting_is_quiet_and_deterministic(caplog):
    net = nn.Sequential(DynOPool(2.0), nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(4 * 4 * 4, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level(logging.WARNING):
            counts = {count_flops(net, (3, 16, 16)) for _ in range(3)}
    assert len(counts) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_bad_input_size_is_a_user_error():
    with pytest.raises(UserInputError):
        count_flops(nn.Conv2d(3, 3, 1), (3, 0, 8))
    with pytest.raises(UserInputError):
        count_flops(nn.Conv2d(3, 3, 1), (8, 8))


@pytest.mark.parametrize(
    "n, text",
    [(4_111_512_576, "4.11G"), (4e9, "4G"), (3.995e9, "4G"), (999.7e6, "1G"), (750_000, "750k"),
     (12, "12"), (1500, "1.5k"), (2.5e12, "2.5T"), (3_000_000, "3M")],
)
def test_format_flops(n, text):
    assert format_flops(n) == text


class _Attention(nn.Module):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.fused = fused

    def forward(self, x):  # x: N x C x H x W; 2 heads over the H*W tokens, v wider than q/k
        t = x.flatten(2).transpose(1, 2)  # N x L x C
        q = k = t.reshape(t.shape[0], t.shape[1], 2, -1).transpose(1, 2)  # N x 2 x L x C/2
        v = torch.cat([q, q], -1)  # d_v = C
        if self.fused:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return (q @ k.transpose(-2, -1)).softmax(-1) @ v


def test_fused_attention_counts_as_its_two_matmuls():
    # L = 6*5 = 30 tokens, 2 heads, d = 4, d_v = 8: 2 * 30 * 30 * (4 + 8)
    assert count_flops(_Attention(fused=True), (8, 6, 5)) == count_flops(_Attention(fused=False), (8, 6, 5)) == 21600
    vit = {}
    for fused in (True, False):
        model = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=64)
        for block in model.blocks:
            block.attn.fused_attn = fused
        vit[fused] = count_flops(model, (3, 64, 64))
    assert vit[True] == vit[False]


class _Rows(nn.Module):
    """A recurrent layer run along every row of a map (timm's Sequencer)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        n, c, h, w = x.shape
        out, _ = self.layer(x.permute(0, 2, 3, 1).reshape(n * h, w, c))
        return out


@pytest.mark.parametrize("cls, gates", [(nn.LSTM, 4), (nn.GRU, 3), (nn.RNN, 1)])
def test_recurrent_layers_count_their_weight_matrices_at_every_step(cls, gates):
    # 5 rows of 6 steps; two bidirectional layers of hidden size 4 over 3 channels: layer 1 reads
    # 3 inputs, layer 2 the 8 outputs of both directions, each also its 4 hidden values
    layer = cls(3, 4, num_layers=2, batch_first=True, bidirectional=True)
    per_step = 2 * gates * 4 * ((3 + 4) + (8 + 4))
    assert count_flops(_Rows(layer), (3, 5, 6)) == 5 * 6 * per_step


def test_recurrent_cells_count_one_step():
    class Cells(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm, self.gru = nn.LSTMCell(3, 4), nn.GRUCell(3, 4)

        def forward(self, x):
            v = x.flatten(2).amax(2)  # uncounted by fvcore
            h, _ = self.lstm(v)
            return self.gru(v) + h

    assert count_flops(Cells(), (3, 5, 6)) == 4 * 4 * (3 + 4) + 3 * 4 * (3 + 4)


def test_a_model_fvcore_cannot_trace_is_told_apart_from_a_bad_input_size():
    class IntInOutput(nn.Module):  # runs, but torch.jit.trace refuses a plain int among the outputs
        def forward(self, x):
            return {"map": x * 2, "count": 3}

    from dynopool_convert.errors import UnsupportedModelError

    assert IntInOutput()(torch.zeros(1, 3, 8, 8))["count"] == 3
    with pytest.raises(UnsupportedModelError, match="fvcore cannot count this model's FLOPs .* runs on an input"):
        count_flops(IntInOutput(), (3, 8, 8))
    with pytest.raises(UserInputError, match="the model fails on an input of size"):
        count_flops(nn.Conv2d(3, 4, 3), (1, 8, 8))


def test_multihead_attention_is_counted_in_eval_mode_without_gradients():
    # in eval mode without gradients nn.MultiheadAttention runs one fused op fvcore does not
    # count; counting keeps it on its standard path (torchvision's ViTs: 11.3G -> 17.6G)
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            t = x.flatten(2).transpose(1, 2)  # 1 x L x 8, L = 4 * 5
            return self.attn(t, t, t, need_weights=False)[0]

    tokens, dim = 4 * 5, 8
    projections = tokens * dim * 3 * dim + tokens * dim * dim  # in_proj (q, k, v) and out_proj
    attention = tokens * tokens * (dim + dim)  # q @ k^T and attn @ v over both heads
    assert count_flops(Tokens().eval(), (8, 4, 5)) == projections + attention
    assert torch.backends.mha.get_fastpath_enabled()  # restored
