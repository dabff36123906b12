"""Weight quantization on nodes: memory held, accounting, and outputs that stay close to float32."""

import pytest
import torch

from edgeswarm.model.profiling import block_parameter_bytes
from edgeswarm.model.quantization import BF16Linear, Int8Linear, quantize_block
from edgeswarm.model.span import SpanCache, TransformerSpan


def _span(source, quant: str, start: int = 0, end: int = 3) -> TransformerSpan:
    return TransformerSpan(source.config, start, end, (source.block_state(i) for i in range(start, end)), quant=quant)


@pytest.fixture(scope="module")
def inputs(smollm):
    torch.manual_seed(0)
    hidden = torch.nn.functional.embedding(torch.randint(0, 1000, (1, 24)), smollm.head_weights().embed_tokens)
    return hidden, torch.arange(24)[None], torch.ones(1, 24, dtype=torch.bool)


@pytest.mark.parametrize("quant, ratio", [("bf16", 0.5), ("int8", 0.25)])
def test_quantized_weights_take_their_share_of_memory(smollm, quant, ratio):
    full, quantized = _span(smollm, "none"), _span(smollm, quant)
    # int8 adds one bfloat16 scale per output channel: under 1% here
    assert quantized.weight_bytes == pytest.approx(ratio * full.weight_bytes, rel=0.01)
    assert quantized.weight_bytes == 3 * block_parameter_bytes(smollm.config, quant)
    assert full.weight_bytes == 3 * block_parameter_bytes(smollm.config, "none")
    linear_types = {type(module) for module in quantized.modules() if isinstance(module, (BF16Linear, Int8Linear))}
    assert linear_types == {BF16Linear if quant == "bf16" else Int8Linear}
    assert not any(isinstance(module, torch.nn.Linear) for module in quantized.layers.modules())


def _decode(span: TransformerSpan, hidden, positions, mask, steps: int) -> torch.Tensor:
    """Prefill all but the last `steps` tokens, then feed those one by one through the KV cache."""
    cache, split = SpanCache(), hidden.shape[1] - steps
    span(hidden[:, :split], positions[:, :split], mask[:, :split], cache)
    outputs = [span(hidden[:, i : i + 1], positions[:, i : i + 1], mask[:, i : i + 1], cache) for i in range(split, hidden.shape[1])]
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("quant", ["bf16", "int8"])
def test_quantized_span_stays_close_to_float32_in_prefill_and_decode(smollm, inputs, quant):
    full, quantized = _span(smollm, "none"), _span(smollm, quant)
    # 24 rows take the float32 path with quantized weights; single tokens take the low-precision kernels
    pairs = [(quantized(*inputs), full(*inputs)), (_decode(quantized, *inputs, 4), _decode(full, *inputs, 4))]
    for output, expected in pairs:
        cosine = torch.nn.functional.cosine_similarity(output.flatten(), expected.flatten(), dim=0)
        assert output.dtype == torch.float32
        assert cosine.item() > 0.995
        assert not torch.equal(output, expected)  # it really is another computation


@pytest.mark.parametrize("quant", ["bf16", "int8"])
@pytest.mark.parametrize("rows", [1, 16])  # the decode kernel and the float32 path
def test_quantized_linear_keeps_its_bias(quant, rows):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32, bias=True)
    torch.nn.init.constant_(linear.bias, 3.0)
    x = torch.randn(rows, 64)
    expected = linear(x)
    output = quantize_block(torch.nn.Sequential(linear), quant)(x)
    assert torch.allclose(output, expected, atol=0.05)
    assert output.mean().item() == pytest.approx(expected.mean().item(), abs=0.05)


def test_unknown_quantization_is_refused(smollm):
    with pytest.raises(ValueError, match="unknown weight quantization 'fp8'"):
        _span(smollm, "fp8", 0, 1)
