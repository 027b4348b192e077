"""The three masks of the reference design, materialised on small cases and compared with hand-written ones."""

import pytest
import torch

from sirocco.plan import BatchPlan, unrotate_slots


def m(rows):
    return torch.tensor([[c == "1" for c in r.split()] for r in rows])


def test_first_chunk_block_diagonal_causal_windowed():
    plan = BatchPlan.build([5, 2], windows=[3]).for_window(3)
    expected = m(["1 . . . . . .",
                  "1 1 . . . . .",
                  "1 1 1 . . . .",
                  ". 1 1 1 . . .",
                  ". . 1 1 1 . .",
                  ". . . . . 1 .",
                  ". . . . . 1 1"])
    assert torch.equal(plan.dense, expected)
    # per-sequence blocks: the first needs the window cut, the second is plain causal
    assert torch.equal(plan.blocks[0], expected[:5, :5]) and plan.blocks[1] is None


def test_first_chunk_without_window_is_plain_causal():
    plan = BatchPlan.build([3, 2], windows=[None]).for_window(None)
    assert torch.equal(plan.dense, m(["1 . . . .", "1 1 . . .", "1 1 1 . .", ". . . 1 .", ". . . 1 1"]))
    assert plan.blocks == [None, None]


def test_later_chunk_bottom_right_against_unrotated_cache():
    # W = S = 3. Sequence 0 has seen 4 tokens (cache holds positions 1, 2, 3) and brings 2 (positions 4, 5);
    # sequence 1 has seen 1 (position 0) and brings 5 (positions 1..5): a chunk longer than W.
    plan = BatchPlan.build([2, 5], starts=[4, 1], rows=[0, 1], windows=[3], cache_lens={3: 3}).for_window(3)
    assert plan.kv_seqlens == [5, 6] and plan.prefix_lens == [3, 1]
    assert plan.k_pos.tolist() == [1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]
    #                 keys: seq 0: 1 2 3 4 5 | seq 1: 0 1 2 3 4 5
    expected = m([". 1 1 1 . . . . . . .",
                  ". . 1 1 1 . . . . . .",
                  ". . . . . 1 1 . . . .",
                  ". . . . . 1 1 1 . . .",
                  ". . . . . . 1 1 1 . .",
                  ". . . . . . . 1 1 1 .",
                  ". . . . . . . . 1 1 1"])
    assert torch.equal(plan.dense, expected)
    # cached positions 1, 2, 3 of row 0 sit in slots 1, 2, 0: read back oldest first
    assert plan.prefix_row.tolist() == [0, 0, 0, 1] and plan.prefix_slot.tolist() == [1, 2, 0, 0]
    # only the last 3 tokens of sequence 1's chunk are written (positions 3, 4, 5 -> slots 0, 1, 2)
    assert plan.write_src.tolist() == [0, 1, 4, 5, 6]
    assert plan.write_slot.tolist() == [1, 2, 0, 1, 2]


def test_decode_offset_padded_keys():
    plan = BatchPlan.build([1, 1, 1], starts=[1, 6, 2], rows=[0, 1, 2], windows=[4],
                           cache_lens={4: 4}).for_window(4)
    assert plan.decode and plan.decode_len == 4
    assert torch.equal(plan.decode_valid, m(["1 1 . .", "1 1 1 1", "1 1 1 ."]))
    assert plan.write_slot.tolist() == [1, 2, 2]
    # early on, only the filled prefix of the rows is read
    early = BatchPlan.build([1, 1], starts=[0, 2], rows=[0, 1], windows=[4], cache_lens={4: 4}).for_window(4)
    assert early.decode_len == 3 and torch.equal(early.decode_valid, m(["1 . .", "1 1 1"]))


def test_reference_worked_example_slots_and_flags():
    """shared/REFERENCE.md: W=3, seqlens [5,7,2], seen [0,1,3] -> flags and flat slots."""
    W = 3
    plan = BatchPlan.build([5, 7, 2], starts=[0, 1, 3], rows=[0, 1, 2], windows=[W],
                           cache_lens={W: W})
    wp = plan.for_window(W)
    assert plan.positions.tolist() == [0, 1, 2, 3, 4, 1, 2, 3, 4, 5, 6, 7, 3, 4]
    flags = torch.zeros(14, dtype=torch.long)
    flags[wp.write_src] = 1
    assert flags.tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert (wp.write_row * W + wp.write_slot).tolist() == [2, 0, 1, 5, 3, 4, 6, 7]


def test_unrotate_slots():
    assert unrotate_slots(0, 3) == []
    assert unrotate_slots(2, 3) == [0, 1]
    assert unrotate_slots(3, 3) == [0, 1, 2]
    assert unrotate_slots(4, 3) == [1, 2, 0]
    assert unrotate_slots(8, 3) == [2, 0, 1]


# -- drafts: decode sequences of several tokens on a ring with room for them ------------------------------------
def window_positions(plan):
    """For each decode query, the positions its canonical entries hold (None where invalid)."""
    span = plan.span
    out = []
    for p, valid in zip(plan.q_pos.tolist(), plan.decode_valid.tolist(), strict=True):
        out.append([p - (p - entry) % span if ok else None for entry, ok in enumerate(valid)])
    return out


def test_canonical_order_on_a_ring_with_room_for_drafts():
    """The plan's docstring example: W = 4, S = 6, a query at position 9 reads positions 8, 9, 6, 7 (residues
    0..3 modulo 4) from slots 2, 3, 0, 1."""
    plan = BatchPlan.build([1], starts=[9], rows=[0], windows=[4], cache_lens={4: 6}).for_window(4)
    assert plan.span == 4 and plan.query_rows is not None
    assert window_positions(plan) == [[8, 9, 6, 7]]
    assert plan.decode_slots.tolist() == [[2, 3, 0, 1]]
    # before the ring wraps it is the plain path: slot l is entry l
    early = BatchPlan.build([1], starts=[2], rows=[0], windows=[4], cache_lens={4: 6}).for_window(4)
    assert early.query_rows is None and early.decode_len == 3


def test_a_draft_s_queries_each_see_their_own_window_and_no_later_draft():
    """Row 1 verifies a draft after its last token at position 7 (queries 7, 8, 9: W = 4, S = 6): every key is
    written first, then each query reads exactly positions (p - 4, p], never a later draft."""
    plan = BatchPlan.build([3, 1], starts=[7, 2], rows=[1, 0], windows=[4], cache_lens={4: 6},
                           decode=2).for_window(4)
    assert plan.decode and plan.q_pos.tolist() == [7, 8, 9, 2]
    assert plan.write_row.tolist() == [1, 1, 1, 0] and plan.write_slot.tolist() == [1, 2, 3, 2]
    assert plan.query_rows.tolist() == [1, 1, 1, 0] and plan.decode_fill == [4, 4, 4, 3]
    assert [sorted(p for p in ps if p is not None) for ps in window_positions(plan)] == \
        [[4, 5, 6, 7], [5, 6, 7, 8], [6, 7, 8, 9], [0, 1, 2]]
    assert plan.decode_slots.tolist()[:3] == [[4, 5, 0, 1], [2, 5, 0, 1], [2, 3, 0, 1]]


def test_a_draft_too_long_for_the_ring_is_refused():
    with pytest.raises(ValueError, match=r"needs a ring of at least 6 slots .* this cache has 5"):
        BatchPlan.build([3], starts=[7], rows=[0], windows=[4], cache_lens={4: 5}, decode=1)
    # before the ring wraps nothing is overwritten: allowed
    BatchPlan.build([3], starts=[0], rows=[0], windows=[4], cache_lens={4: 5}, decode=1)


def test_a_mixed_step_with_a_draft_splits_by_tokens_and_pre_fill_reads_only_the_window():
    """A verified draft (3 tokens) first, then a pre-fill chunk: the parts split the step's tokens 3 + 2; the chunk's
    cached prefix on a ring of 6 slots is its last 4 positions (the window), as on a ring of exactly the window."""
    plan = BatchPlan.build([3, 2], starts=[7, 9], rows=[1, 0], windows=[4], cache_lens={4: 6}, decode=1)
    dec, pre = plan.for_window(4).parts
    assert dec.q_pos.tolist() == [7, 8, 9] and pre.q_pos.tolist() == [9, 10]
    assert pre.prefix_lens == [4] and pre.k_pos.tolist() == [5, 6, 7, 8, 9, 10]
    assert pre.prefix_slot.tolist() == [5, 0, 1, 2]
    plain = BatchPlan.build([2], starts=[9], rows=[0], windows=[4], cache_lens={4: 4}).for_window(4)
    assert torch.equal(pre.dense, plain.dense)
    with pytest.raises(ValueError, match="decode must count 0 to 2"):
        BatchPlan.build([3, 2], starts=[7, 9], rows=[1, 0], windows=[4], cache_lens={4: 6}, decode=3)
