"""The one sampling step: tokens, log-probabilities and top-k of every row in one call, logits processors applied
batched, and drafts verified so that the output keeps the target distribution."""

import math

import pytest
import torch

from sirocco.distributed.executor import pack, packed_size, unpack
from sirocco.generate.sampling import (
    AllowedTokens,
    LogitsProcessor,
    RowSampling,
    SamplingParams,
    TokenBias,
    filter_logits,
    make_generator,
    mask_words,
    sample,
    unpack_mask,
)

CPU = torch.device("cpu")


def reference_sample(logits, params, generators):
    """The sampling rule written plainly, row by row: argmax for greedy rows, else a draw from the filtered
    softmax with the row's generator; log-probabilities of the raw distribution."""
    tokens, logprobs = [], []
    for row, p, g in zip(logits, params, generators, strict=True):
        if p.temperature > 0:
            probs = torch.softmax(filter_logits(row, p.temperature, p.top_k, p.top_p), dim=-1)
            t = int(torch.multinomial(probs, 1, generator=g))
        else:
            t = int(torch.argmax(row))
        tokens.append(t)
        logprobs.append(float(torch.log_softmax(row.float(), dim=-1)[t]))
    return tokens, logprobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_without_processors_sample_as_the_plain_rule(dtype):
    logits = (torch.randn(5, 50) * 3).to(dtype)
    params = [SamplingParams(), SamplingParams(temperature=0.8, seed=1),
              SamplingParams(temperature=1.3, top_k=5, seed=2), SamplingParams(temperature=0.5, top_p=0.7, seed=3),
              SamplingParams()]
    got = sample(logits, [RowSampling(p, make_generator(p.seed, CPU) if p.temperature else None) for p in params])
    want = reference_sample(logits, params, [make_generator(p.seed, CPU) if p.temperature else None for p in params])
    assert [g.tokens[0] for g in got] == want[0]
    assert [g.logprobs[0] for g in got] == want[1]
    assert all(g.top is None for g in got)


def test_top_logprobs_are_the_most_likely_of_the_unmodified_distribution():
    logits = torch.randn(3, 40)
    rows = [RowSampling(SamplingParams(logprobs=4, temperature=0.7, top_k=3, seed=5), make_generator(5, CPU)),
            RowSampling(SamplingParams()), RowSampling(SamplingParams(logprobs=1), processor=TokenBias({7: 50.0}))]
    got = sample(logits, rows)
    ref = torch.log_softmax(logits, dim=-1)
    for i, k in ((0, 4), (2, 1)):
        values, ids = ref[i].topk(k)
        assert got[i].top == [list(zip(ids.tolist(), values.tolist(), strict=True))]
    assert got[1].top is None
    assert got[2].tokens == [7] and got[2].logprobs == [float(ref[2, 7])]     # biased choice, raw log-probability


def test_an_allowed_token_mask_is_obeyed_greedy_and_sampled():
    torch.manual_seed(0)
    logits = torch.randn(2, 100)
    allowed = [3, 17, 64, 99]
    greedy = sample(logits, [RowSampling(SamplingParams(), processor=AllowedTokens(allowed, 100)),
                             RowSampling(SamplingParams())])
    assert greedy[0].tokens == [max(allowed, key=lambda t: float(logits[0, t]))]
    assert greedy[1].tokens == [int(logits[1].argmax())]                       # the row beside it is untouched
    g = make_generator(9, CPU)
    seen = {sample(logits[:1], [RowSampling(SamplingParams(temperature=2.0), g, AllowedTokens(allowed, 100))])[0]
            .tokens[0] for _ in range(200)}
    assert seen <= set(allowed) and len(seen) > 1


def test_a_row_s_result_does_not_depend_on_the_processed_rows_beside_it():
    logits = torch.randn(4, 64)
    params = SamplingParams(temperature=0.9, seed=4, logprobs=2)
    alone = sample(logits[1:2], [RowSampling(params, make_generator(4, CPU))])[0]
    packed = sample(logits, [RowSampling(SamplingParams(), processor=AllowedTokens([1, 2], 64)),
                             RowSampling(params, make_generator(4, CPU)),
                             RowSampling(SamplingParams(temperature=1.0, seed=1), make_generator(1, CPU),
                                         TokenBias({5: -100.0})),
                             RowSampling(SamplingParams())])[1]
    assert packed == alone


def test_packed_masks_unpack_to_their_tokens():
    vocab = 70
    ids = [0, 31, 32, 33, 63, 64, 69]
    words = torch.empty(1, mask_words(vocab), dtype=torch.int32)
    assert AllowedTokens(ids, vocab).fill_mask(words, ())
    assert unpack_mask(words, vocab)[0].nonzero()[:, 0].tolist() == ids


def test_greedy_verification_keeps_the_agreeing_prefix_and_the_target_s_next_token():
    # the module docstring's example: argmaxes [7, 9, 5, 2] against the draft [7, 9, 4]
    logits = torch.full((5, 12), -5.0)
    for i, t in enumerate([7, 9, 5, 2, 11]):
        logits[i, t] = 5.0
    got = sample(logits, [RowSampling(SamplingParams(), draft=[7, 9, 4]), RowSampling(SamplingParams())])
    assert got[0].tokens == [7, 9, 5]
    assert got[1].tokens == [11]
    ref = torch.log_softmax(logits, dim=-1)
    assert got[0].logprobs == [float(ref[0, 7]), float(ref[1, 9]), float(ref[2, 5])]
    all_right = sample(logits[:4], [RowSampling(SamplingParams(), draft=[7, 9, 5])])[0]
    assert all_right.tokens == [7, 9, 5, 2]                                    # every draft kept, plus one more


def _chi_square(counts, probs, n):
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs, strict=True) if p > 0)


@pytest.mark.parametrize("drafter", ["one-hot", "distribution"])
def test_rejection_sampling_keeps_the_target_distribution(drafter):
    """The first token a sampled row keeps is distributed as the target's next token, whatever the draft."""
    vocab, n = 6, 3000
    target = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5])
    draft_q = torch.softmax(torch.tensor([0.0, 2.0, 1.0, 1.0, 0.0, -1.0]), dim=-1)
    p = torch.softmax(target, dim=-1)
    logits = torch.stack([target, torch.zeros(vocab)])            # the target at the draft position, then anything
    g, gq = make_generator(0, CPU), make_generator(1, CPU)
    counts = [0] * vocab
    for _ in range(n):
        d = int(torch.multinomial(draft_q, 1, generator=gq))
        row = RowSampling(SamplingParams(temperature=1.0), g, draft=[d],
                          draft_probs=draft_q[None] if drafter == "distribution" else None)
        counts[sample(logits, [row])[0].tokens[0]] += 1
    # 5 degrees of freedom: P(chi2 > 20.5) = 0.001
    assert _chi_square(counts, p.tolist(), n) < 20.5, counts


def test_a_rejected_one_hot_draft_is_never_the_token_drawn_instead():
    logits = torch.stack([torch.tensor([0.0, 0.0, 5.0]), torch.zeros(3)])
    g = make_generator(3, CPU)
    for _ in range(300):
        toks = sample(logits, [RowSampling(SamplingParams(temperature=1.0), g, draft=[0])])[0].tokens
        assert toks[0] != 0 or len(toks) == 2                      # kept (then one more), or replaced by another


class Recorder(LogitsProcessor):
    """Allows every token but 0 and records what it is told."""

    def __init__(self, vocab):
        self.vocab, self.drafts, self.accepted = vocab, [], []

    def fill_mask(self, out, draft):
        self.drafts.append(list(draft))
        out[:] = -1                                                  # every bit set
        out[:, 0] &= ~1
        return True

    def accept(self, tokens):
        self.accepted += tokens


def test_a_processor_fills_one_mask_row_per_position_of_a_draft():
    logits = torch.zeros(3, 40)
    logits[:, 0] = 10.0
    logits[:, 5] = 5.0
    rec = Recorder(40)
    got = sample(logits, [RowSampling(SamplingParams(), processor=rec, draft=[5, 5])])[0]
    assert rec.drafts == [[5, 5]]
    assert got.tokens == [5, 5, 5]                                     # token 0, the argmax, is masked everywhere


def test_the_pipeline_message_carries_every_result_exactly():
    vocab = 50
    rows = [RowSampling(SamplingParams(logprobs=3)), RowSampling(SamplingParams(), draft=[1, 2, 3]),
            RowSampling(SamplingParams(logprobs=60), draft=[4])]
    logits = torch.randn(7, vocab)
    results = sample(logits, rows)
    message = pack(results, rows, vocab)
    assert message.numel() == packed_size(rows, vocab)
    assert unpack(message.tolist(), rows, vocab) == results
    assert all(math.isfinite(v) for v in message.tolist())


def test_a_one_hot_draft_is_verified_with_the_draws_of_plain_sampling():
    """With q one-hot, verification draws the target's token at each position with the row's generator, as steps
    without a draft would, and keeps the draft while they agree: the same tokens, and the generator left where
    those plain steps leave it."""
    torch.manual_seed(1)
    logits = torch.randn(4, 30) * 2
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=11)
    for draft in ([], [3], [5, 9, 1]):
        g_plain = make_generator(11, CPU)
        plain = []
        for j in range(len(draft) + 1):
            plain.append(sample(logits[j:j + 1], [RowSampling(params, g_plain)])[0].tokens[0])
            if j == len(draft) or plain[-1] != draft[j]:
                break
        g = make_generator(11, CPU)
        got = sample(logits[:len(draft) + 1], [RowSampling(params, g, draft=draft)])[0].tokens
        assert got == plain
        assert torch.equal(g.get_state(), g_plain.get_state())
    # a draft of the tokens plain sampling draws is kept whole
    g = make_generator(11, CPU)
    whole = [sample(logits[j:j + 1], [RowSampling(params, g)])[0].tokens[0] for j in range(4)]
    got = sample(logits, [RowSampling(params, make_generator(11, CPU), draft=whole[:3])])[0].tokens
    assert got == whole
