"""Perplexity of a text in windows of a fixed context, with a stride (Hugging Face's "perplexity of fixed-length
models" scheme).

Windows start every ``stride`` tokens and hold at most ``context`` tokens; each scores only the tokens the previous
window did not (its last ``end - previous end``), each predicted from everything before it in the window. A
window's first token has nothing before it in the window and is never scored there: the text's first token (BOS)
is never scored, and with ``stride < context`` every other token is scored exactly once (T - 1 of T tokens).
With ``stride == context`` (non-overlapping windows, as in the guide's loop) the first token of each later window
is skipped too, as transformers' shifted labels skip it.

    windows(10, context=4, stride=2) -> [(0, 4, 3), (2, 6, 2), (4, 8, 2), (6, 10, 2)]   # (begin, end, scored)
    windows(10, context=4, stride=4) -> [(0, 4, 3), (4, 8, 3), (8, 10, 1)]

Hugging Face's guide weights each window's mean loss by (valid labels - 1); that is the count of scored tokens in
the first window only (later windows score all their valid labels), so it undercounts by one per later window.
Here each window adds its summed negative log-likelihood and its exact count.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..model import Transformer


@dataclass
class PerplexityResult:
    tokens: int                 # tokens scored
    nats_per_token: float       # mean negative log-likelihood
    perplexity: float           # exp(nats_per_token)

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "nats_per_token": self.nats_per_token, "perplexity": self.perplexity}


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored) of each window: tokens [begin, end) are fed, the last ``scored`` are scored."""
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens, got {context}")
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in 1..context ({context}), got {stride}")
    out = []
    prev_end = 1                                   # token 0 is never scored
    for begin in range(0, max(n_tokens - 1, 0), stride):
        end = min(begin + context, n_tokens)
        scored = min(end - prev_end, end - begin - 1)
        if scored > 0:
            out.append((begin, end, scored))
            prev_end = end
        if end == n_tokens:
            break
    return out


@torch.no_grad()
def perplexity(model: Transformer, tokens: Sequence[int] | torch.Tensor, context: int, stride: int | None = None,
               progress: bool | None = None) -> PerplexityResult:
    """Perplexity of ``tokens`` (BOS first, as the tokenizer encodes a text) under ``model`` (a Transformer), in
    windows of ``context`` tokens every ``stride`` (default: ``context``, no overlap). Log-probabilities in fp32."""
    ids = torch.as_tensor(list(tokens) if not isinstance(tokens, torch.Tensor) else tokens, dtype=torch.long)
    if ids.numel() < 2:
        raise ValueError("perplexity needs at least two tokens")
    if context > model.args.max_seq_len:
        raise ValueError(f"context {context} is longer than the model's max_seq_len {model.args.max_seq_len}")
    stride = context if stride is None else stride
    spans = windows(ids.numel(), context, stride)
    device = model.device
    nll, count = 0.0, 0
    bar = tqdm(total=ids.numel() - 1, unit="tok", desc="perplexity", leave=False,
               disable=None if progress is None else not progress)
    for begin, end, scored in spans:
        x = ids[begin:end].to(device)
        n = end - begin
        at = torch.arange(n - 1 - scored, n - 1, device=device)        # positions predicting the scored tokens
        logits = model(x, [n], logits_at=at).float()
        targets = x[n - scored:]
        nll += F.cross_entropy(logits, targets, reduction="sum").item()
        count += scored
        bar.update(scored)
    bar.close()
    mean = nll / count
    return PerplexityResult(count, mean, math.exp(mean))
