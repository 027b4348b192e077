"""The huge-page memory that quantized blocks are loaded into."""
import gc

import torch

from sirocco.backends.quant.hugepages import HUGE_PAGE, huge_page_tensors


def test_tensors_are_carved_from_one_aligned_mapping_each_its_own_storage():
    a, b, empty = huge_page_tensors([(3, 34), (2, 18), (0, 18)])
    assert a.shape == (3, 34) and b.shape == (2, 18) and empty.shape == (0, 18)
    assert a.dtype == b.dtype == torch.uint8 and a.is_contiguous() and b.is_contiguous()
    assert a.data_ptr() % HUGE_PAGE == 0                      # the mapping's start moved to a 2 MiB boundary
    assert b.data_ptr() - a.data_ptr() == 128                 # 102 bytes rounded up to a cache line
    assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    a.fill_(7)
    b.fill_(9)
    assert a.sum().item() == 7 * 102 and b.sum().item() == 9 * 36


def test_the_mapping_lives_as_long_as_one_tensor_does():
    tensors = huge_page_tensors([(1024,), (4096,)])
    last = tensors[1]
    last.copy_(torch.arange(4096) % 251)
    del tensors
    gc.collect()
    assert torch.equal(last, (torch.arange(4096) % 251).to(torch.uint8))


def test_quantize_at_load_puts_the_blocks_in_it(tmp_path):
    from sirocco.backends.quant.linear import QuantLinear
    from sirocco.checkpoint import load_quantized, save_consolidated
    from sirocco.config import preset
    from sirocco.model import build_model
    args = preset("tiny")
    save_consolidated(build_model(args, seed=0), args, tmp_path / "ckpt")
    loaded, _ = load_quantized(tmp_path / "ckpt", "q8_0")
    blocks = [m.qweight for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert blocks and min(q.data_ptr() for q in blocks) % HUGE_PAGE == 0
    assert all(q.data_ptr() % 64 == 0 for q in blocks)
