"""One sampling step: a step's logits and each row's request in, every row's tokens out.

    logits (N, V) --processors (bias, allowed-token mask), batched--> scores
        --per row: greedy argmax, or a seeded draw; with a draft, verification--> tokens
        --log_softmax of the unmodified logits--> log-probabilities, top-k alternatives

Each row samples with its own ``torch.Generator``, so what a sequence generates does not depend on which other
sequences share its step. Log-probabilities (and the top-k alternatives) are always those of the unmodified
distribution: before processors, temperature, top-k and top-p, as the ``--json`` output promises.

A row may bring a **draft**: tokens proposed for its next positions, whose logits the step computed too (the
row then owns ``len(draft) + 1`` consecutive rows of ``logits``). Verification keeps the output distribution the
target model's: greedy rows keep the longest prefix of the draft that equals the argmax, then the argmax after
it; sampled rows accept draft token d with probability min(1, p(d) / q(d)) and, at the first rejection, draw
from max(0, p - q) renormalised (q: the drafter's distribution, or a one-hot on d for a drafter that chose d
without one). Either way the row gains between 1 and ``len(draft) + 1`` tokens.

With q one-hot the rule is realised with the random numbers of plain sampling: the row draws the target's own
token at each position, with its generator, as a step without a draft would, and keeps the draft token while
the two agree. Agreement has probability p(d) = min(1, p(d) / 1), and a token drawn after a disagreement is
distributed as p without d, renormalised: max(0, p - q) normalised. So the rule's distribution is kept and, the
draws being those of plain decoding in the same order, a seeded row gets the very tokens it gets without a draft.

Worked example (greedy, draft [7, 9, 4]): the row has 4 logits rows whose argmaxes are [7, 9, 5, 2]; 7 and 9
agree, 4 does not, so the row's tokens are [7, 9, 5] (the target's own token where the draft went wrong).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

MASK_BITS = 32      # allowed-token masks are packed 32 tokens to an int32 word, bit t % 32 of word t // 32


def mask_words(vocab_size: int) -> int:
    """int32 words of a packed mask over ``vocab_size`` tokens.

    >>> mask_words(32000), mask_words(33)
    (1000, 2)
    """
    return (vocab_size + MASK_BITS - 1) // MASK_BITS


class LogitsProcessor:
    """What shapes one row's distribution before it is sampled: an additive bias, a mask of allowed tokens, or
    both. Built per row when the row starts (``Constraint.processor``), told every token the row keeps
    (``accept``), so it may carry state (a grammar's position). This base class allows everything."""

    def bias(self) -> tuple[Sequence[int], Sequence[float]] | None:
        """(token ids, values) added to the logits of every position of the row, or None."""
        return None

    def fill_mask(self, out: torch.Tensor, draft: Sequence[int]) -> bool:
        """Write the allowed tokens of the row's next ``len(draft) + 1`` positions into ``out`` (that many rows of
        int32 words, packed as ``MASK_BITS`` says; row j: what may follow the draft's first j tokens). Returns
        False, leaving ``out`` unwritten, where every token is allowed at every position. A draft token this
        processor does not allow is rejected by its own row's mask, so the rows after it are never used: fill them
        with anything. Nothing here is kept: only ``accept`` advances."""
        return False

    def accept(self, tokens: Sequence[int]) -> None:
        """The row kept these tokens (in order): advance past them."""

    def finished(self) -> bool:
        """Whether nothing but EOS may follow what was accepted (a grammar is complete): the row then ends
        without spending a step on the EOS."""
        return False


class TokenBias(LogitsProcessor):
    """OpenAI's ``logit_bias``: a fixed value added to some tokens' logits (-100 bans a token in practice)."""

    def __init__(self, bias: Mapping[int, float]):
        self.ids = list(bias)
        self.values = [float(v) for v in bias.values()]

    def bias(self) -> tuple[Sequence[int], Sequence[float]] | None:
        return self.ids, self.values


class AllowedTokens(LogitsProcessor):
    """Only these tokens, at every position (a fixed set: a choice among labels, or a test of the mask path)."""

    def __init__(self, allowed: Sequence[int], vocab_size: int):
        words = torch.zeros(mask_words(vocab_size), dtype=torch.int64)
        for t in set(allowed):
            words[t // MASK_BITS] |= 1 << (t % MASK_BITS)
        self.words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)   # the bits as int32

    def fill_mask(self, out: torch.Tensor, draft: Sequence[int]) -> bool:
        out[:] = self.words.to(out.device)
        return True


class Constraint(Protocol):
    """A description of what a row may generate (a token set, a grammar), carried by ``SamplingParams``: a value
    that pipeline ranks receive in the request, from which each builds the row's processor when the row starts."""

    def processor(self, tokenizer: object, vocab_size: int) -> LogitsProcessor: ...


class _Both(LogitsProcessor):
    """A bias and a constraint's processor on one row."""

    def __init__(self, bias: LogitsProcessor, inner: LogitsProcessor):
        self.bias_of, self.inner = bias, inner

    def bias(self) -> tuple[Sequence[int], Sequence[float]] | None:
        return self.bias_of.bias()

    def fill_mask(self, out: torch.Tensor, draft: Sequence[int]) -> bool:
        return self.inner.fill_mask(out, draft)

    def accept(self, tokens: Sequence[int]) -> None:
        self.inner.accept(tokens)

    def finished(self) -> bool:
        return self.inner.finished()


@dataclass
class SamplingParams:
    """How one sequence is continued.

    Attributes:
        max_tokens: most tokens to generate.
        temperature: 0 for greedy decoding; otherwise logits are divided by it before sampling.
        top_p: keep the smallest set of tokens whose probability sums to at least top_p (1 keeps all).
        top_k: keep the k most likely tokens (0 keeps all).
        seed: seed of this sequence's random generator (None: a fresh random seed).
        stop: strings that end the generation; the text stops before them.
        stop_on_eos: end at the end-of-sequence token.
        logprobs: how many most likely alternatives to return with each generated token (0: none; the chosen
            token's own log-probability is always returned).
        logit_bias: token id -> value added to its logit before sampling (not to the returned log-probabilities).
        constraint: what the sequence may generate (see ``Constraint``); None: anything.
        draft_tokens: the most tokens drafted for this sequence in one step, where the engine speculates (None:
            the engine's own; 0: no drafts for this sequence).
    """

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: Sequence[str] = field(default_factory=tuple)
    stop_on_eos: bool = True
    logprobs: int = 0
    logit_bias: Mapping[int, float] | None = None
    constraint: Constraint | None = None
    draft_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")
        if self.draft_tokens is not None and self.draft_tokens < 0:
            raise ValueError(f"draft_tokens must be >= 0, got {self.draft_tokens}")

    def processor(self, tokenizer: object, vocab_size: int) -> LogitsProcessor | None:
        """The row's processor for these params (None: nothing to apply). Ids outside the vocabulary raise."""
        bias = None
        if self.logit_bias:
            wrong = [t for t in self.logit_bias if not 0 <= int(t) < vocab_size]
            if wrong:
                raise ValueError(f"logit_bias names token ids outside the vocabulary of {vocab_size}: {wrong[:5]}")
            bias = TokenBias({int(t): v for t, v in self.logit_bias.items()})
        inner = self.constraint.processor(tokenizer, vocab_size) if self.constraint is not None else None
        if bias is not None and inner is not None:
            return _Both(bias, inner)
        return bias or inner


@dataclass
class RowSampling:
    """What one row asks of a step's sampling.

    Attributes:
        params: the sequence's sampling params.
        generator: its random generator (None for greedy rows).
        processor: its logits processor, or None.
        draft: proposed tokens to verify; the row owns ``len(draft) + 1`` rows of the step's logits.
        draft_probs: (len(draft), V) the drafter's distributions at each proposed position (for the rejection
            rule), or None where the drafter chose its tokens without one (q is then one-hot on the draft).
    """

    params: SamplingParams
    generator: torch.Generator | None = None
    processor: LogitsProcessor | None = None
    draft: Sequence[int] = ()
    draft_probs: torch.Tensor | None = None

    @property
    def positions(self) -> int:
        """Logits rows this row owns."""
        return len(self.draft) + 1


@dataclass
class Sampled:
    """What one row gained in a step: ``tokens`` (1 to len(draft) + 1) with their log-probabilities and, where
    the params ask for ``logprobs`` alternatives, ``top``: per token, [(token id, log-probability), ...]."""

    tokens: list[int]
    logprobs: list[float]
    top: list[list[tuple[int, float]]] | None = None


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Scaled and filtered logits (V,) fp32: removed tokens get -inf."""
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens strictly more likely than it already reach top_p; the first always stays.
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    return logits


def unpack_mask(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(R, W) int32 packed masks -> (R, vocab_size) bool, True where the token is allowed.

    >>> unpack_mask(torch.tensor([[0b101, 1]], dtype=torch.int32), 34).nonzero()[:, 1].tolist()
    [0, 2, 32]
    """
    shifts = torch.arange(MASK_BITS, device=words.device, dtype=torch.int32)
    bits = (words[:, :, None] >> shifts) & 1                                   # (R, W, 32)
    return bits.reshape(words.shape[0], -1)[:, :vocab_size].bool()


def processed(logits: torch.Tensor, rows: Sequence[RowSampling]) -> torch.Tensor:
    """The logits every row samples from: each row's bias added and its mask applied, in one operation each over
    the rows that have them. Returns ``logits`` itself when no row has a processor."""
    owners = [(r, i) for r, start in zip(rows, _starts(rows), strict=True) for i in range(start, start + r.positions)
              if r.processor is not None]
    if not owners:
        return logits
    scores = logits.float().clone() if logits.dtype != torch.float32 else logits.clone()
    vocab = logits.shape[-1]
    bias_rows, bias_ids, bias_values = [], [], []
    for row, start in zip(rows, _starts(rows), strict=True):
        if row.processor is None:
            continue
        bias = row.processor.bias()
        if bias is not None:
            ids, values = bias
            for i in range(start, start + row.positions):
                bias_rows += [i] * len(ids)
                bias_ids += list(ids)
                bias_values += list(values)
    if bias_rows:
        index = (torch.tensor(bias_rows, device=logits.device), torch.tensor(bias_ids, device=logits.device))
        scores.index_put_(index, torch.tensor(bias_values, device=logits.device), accumulate=True)
    masked: list[int] = []
    words = torch.empty(len(owners), mask_words(vocab), dtype=torch.int32)
    w = 0
    for row, start in zip(rows, _starts(rows), strict=True):
        if row.processor is None:
            continue
        if row.processor.fill_mask(words[w:w + row.positions], row.draft):
            masked += range(start, start + row.positions)
            w += row.positions
    if masked:
        allowed = unpack_mask(words[:w].to(logits.device), vocab)
        at = torch.tensor(masked, device=logits.device)
        scores[at] = scores[at].masked_fill(~allowed, float("-inf"))
    return scores


def _starts(rows: Sequence[RowSampling]) -> list[int]:
    out, at = [], 0
    for r in rows:
        out.append(at)
        at += r.positions
    return out


def _draw(scores: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One token (a (1,) tensor) drawn from a row's filtered distribution."""
    probs = torch.softmax(filter_logits(scores, p.temperature, p.top_k, p.top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def _verify_sampled(scores: torch.Tensor, row: RowSampling) -> list[int]:
    """The rejection rule over a sampled row's draft (``scores``: its len(draft) + 1 rows): the accepted draft
    tokens, then a token drawn from the residual at the first rejection, or from the last row if none."""
    p, g = row.params, row.generator
    out: list[int] = []
    if row.draft_probs is None:                       # q one-hot: the draws of plain sampling (module docstring)
        for j in range(len(row.draft) + 1):
            out.append(int(_draw(scores[j], p, g)))
            if j == len(row.draft) or out[-1] != row.draft[j]:
                break
        return out
    for j, d in enumerate(row.draft):
        target = torch.softmax(filter_logits(scores[j], p.temperature, p.top_k, p.top_p), dim=-1)
        q = row.draft_probs[j].to(target)
        q_d = float(q[d])
        accept_p = 1.0 if q_d <= 0 else min(1.0, float(target[d]) / q_d)
        if float(torch.rand((), generator=g, device=target.device)) < accept_p:
            out.append(int(d))
            continue
        residual = torch.clamp(target - q, min=0.0)
        total = float(residual.sum())
        # p == q up to rounding leaves nothing to draw from; the target itself is then the exact residual
        residual = residual / total if total > 0 else target
        out.append(int(torch.multinomial(residual, 1, generator=g)))
        return out
    out.append(int(_draw(scores[len(row.draft)], p, g)))
    return out


def sample(logits: torch.Tensor, rows: Sequence[RowSampling]) -> list[Sampled]:
    """Every row's tokens for this step, with their log-probabilities and top-k alternatives.

    Args:
        logits: (N, V) raw logits, N = sum of the rows' ``positions``, each row's rows consecutive.
        rows: one ``RowSampling`` per row, in the order of ``logits``.
    Returns:
        one ``Sampled`` per row, as host lists (one read of the device per step).
    """
    if logits.shape[0] != sum(r.positions for r in rows):
        raise ValueError(f"{logits.shape[0]} logits rows for rows owning {sum(r.positions for r in rows)}")
    scores = processed(logits, rows)
    starts = _starts(rows)
    # Greedy rows' tokens (and the verification of their drafts) come from one argmax over every row.
    argmax = torch.argmax(scores, dim=-1)
    chosen = argmax
    sampled = [b for b, r in enumerate(rows) if r.params.temperature > 0 and not r.draft]
    if sampled:
        picks = [_draw(scores[starts[b]], rows[b].params, rows[b].generator) for b in sampled]
        chosen = argmax.index_put((torch.tensor([starts[b] for b in sampled], device=logits.device),),
                                  torch.cat(picks))
    chosen_host = chosen.tolist()
    tokens: list[list[int]] = []
    for r, start in zip(rows, starts, strict=True):
        if not r.draft:
            tokens.append([chosen_host[start]])
        elif r.params.temperature > 0:
            tokens.append(_verify_sampled(scores[start:start + r.positions], r))
        else:
            kept = 0
            while kept < len(r.draft) and chosen_host[start + kept] == r.draft[kept]:
                kept += 1
            tokens.append(list(r.draft[:kept]) + [chosen_host[start + kept]])
    # Log-probabilities of the unmodified distribution, at each kept position.
    at = torch.tensor([start + j for toks, start in zip(tokens, starts, strict=True) for j in range(len(toks))],
                      device=logits.device)
    flat = torch.tensor([t for toks in tokens for t in toks], device=logits.device)
    logsoft = torch.log_softmax(logits.float(), dim=-1)
    values = logsoft[at, flat].tolist()
    k = max((r.params.logprobs for r in rows), default=0)
    top_values = top_ids = None
    if k:
        top = logsoft[at].topk(min(k, logits.shape[-1]), dim=-1)
        top_values, top_ids = top.values.tolist(), top.indices.tolist()
    out: list[Sampled] = []
    i = 0
    for r, toks in zip(rows, tokens, strict=True):
        n = len(toks)
        top_r = None
        if r.params.logprobs and top_values is not None and top_ids is not None:
            kr = r.params.logprobs
            top_r = [list(zip(top_ids[j][:kr], top_values[j][:kr], strict=True)) for j in range(i, i + n)]
        out.append(Sampled(toks, values[i:i + n], top_r))
        i += n
    return out


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g
