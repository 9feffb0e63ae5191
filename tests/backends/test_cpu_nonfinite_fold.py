"""The "cpu" backend's conv_bn_act with a scale whose BN fold is not finite agrees with the "torch" oracle.

The cpu backend folds scale into the weight. An infinite scale would put inf into every tap of its channel, and
the taps that meet a zero input give inf * 0 = NaN across the channel, where eager's conv(x, w) * inf is +-inf (NaN
only where the convolution is exactly 0). A NaN scale's channel would come out 0 after oneDNN's ReLU post-op,
where eager keeps NaN. Such folds (and a finite scale whose fold overflows) run unfolded: the convolution first,
then scale, shift, residual and ReLU, as eager does.

Inputs are small integers, so that every convolution value is exact in fp32 and bf16 (zeros included): the
inf/-inf/NaN pattern must match the oracle's exactly.
"""

import pytest
import torch

import resnet_fused as rf
from resnet_fused.ops.backends.cpu import CpuConvPack, CpuUnfoldedPack

pytestmark = pytest.mark.skipif(rf.available_backends("cpu")["cpu"] is not None,
                                reason=f"the 'cpu' backend is unavailable: {rf.available_backends('cpu')['cpu']}")

INF, NAN = float("inf"), float("nan")
# inf, -inf, NaN, one that overflows the fp32 fold (|w| up to 2, times 3e38), and ordinary ones.
SCALES = [INF, 1.5, -INF, NAN, 3e38, -0.5, 1.0, 2.0]


def integer_inputs(dtype, residual):
    channels = len(SCALES)
    x = torch.randint(-2, 3, (2, 5, 6, 6)).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.randint(-2, 3, (channels, 5, 3, 3)).to(dtype)
    scale = torch.tensor(SCALES)
    shift = torch.arange(channels, dtype=torch.float32) - 3.0
    res = torch.randint(-4, 5, (2, channels, 6, 6)).to(dtype) if residual else None
    return x, weight, scale, shift, res


def assert_same_nonfinite_and_close(y, ref):
    y, ref = y.float(), ref.float()
    assert torch.equal(torch.isnan(y), torch.isnan(ref)), "NaN positions differ from the oracle's"
    assert torch.equal(torch.isposinf(y), torch.isposinf(ref)), "+inf positions differ from the oracle's"
    assert torch.equal(torch.isneginf(y), torch.isneginf(ref)), "-inf positions differ from the oracle's"
    finite = torch.isfinite(ref)
    torch.testing.assert_close(y[finite], ref[finite], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_nonfinite_fold_matches_oracle(dtype, residual, relu, packed):
    x, weight, scale, shift, res = integer_inputs(dtype, residual)
    ref = rf.conv_bn_act(x, weight, scale, shift, res, padding=1, relu=relu, backend="torch")
    assert torch.isinf(ref).any() and torch.isnan(ref).any()  # the case is the one described above
    if packed:
        pack = rf.ops.pack_conv_bn(weight, scale, shift, padding=1, backend="cpu")
        assert isinstance(pack.payload, CpuUnfoldedPack)
        y = rf.ops.conv_bn_act_packed(x, pack, res, relu=relu)
    else:
        y = rf.conv_bn_act(x, weight, scale, shift, res, padding=1, relu=relu, backend="cpu")
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert_same_nonfinite_and_close(y, ref)


def test_finite_fold_stays_folded():
    x, weight, _, shift, _ = integer_inputs(torch.float32, residual=False)
    scale = torch.linspace(-2.0, 2.0, weight.shape[0])
    pack = rf.ops.pack_conv_bn(weight, scale, shift, padding=1, backend="cpu")
    assert isinstance(pack.payload, CpuConvPack)
    y = rf.ops.conv_bn_act_packed(x, pack, relu=True)
    ref = rf.conv_bn_act(x, weight, scale, shift, padding=1, relu=True, backend="torch")
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)
