"""The three masks of the reference design, materialised on small cases and compared with hand-written ones."""

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
