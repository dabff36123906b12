"""Helpers for tests that run real node processes."""

from __future__ import annotations

import grpc

from proto import dataplane_pb2 as pb
from proto import dataplane_pb2_grpc as pb_grpc


def node_info(address: str) -> pb.NodeInfoResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.BlockServiceStub(channel).NodeInfo(pb.NodeInfoRequest(), timeout=10)


def until_eos(token_ids, eos_ids) -> list[int]:
    """Token ids up to (not including) the first end-of-sequence token, as the client reports them."""
    result = []
    for token in [int(token) for token in token_ids]:
        if token in eos_ids:
            break
        result.append(token)
    return result


def greedy_tokens(session, prompt: list[int], count: int, after_token=None) -> list[int]:
    """Greedy decoding step by step through an inference session; `after_token(i)` runs after token i."""
    import torch

    logits = session.step(torch.tensor([prompt]))
    tokens = []
    for index in range(count):
        tokens.append(int(logits[0].argmax()))
        if after_token is not None:
            after_token(index)
        logits = session.step(torch.tensor([[tokens[-1]]]))
    return tokens


def reference_greedy_tokens(model, prompt: list[int], count: int) -> list[int]:
    """The same greedy loop on a whole transformers model with its own KV cache (no EOS stop)."""
    import torch
    from transformers.cache_utils import DynamicCache

    cache, tokens = DynamicCache(), []
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        for _ in range(count):
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
            tokens.append(int(logits[0, -1].argmax()))
            ids = torch.tensor([[tokens[-1]]])
    return tokens
