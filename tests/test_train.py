"""Training: the loss learns, the step equals its definitions (accumulation, packing, load balance), resume is
exact. Tiny models, fp32, a byte tokenizer, a few thousand tokens of the Python documentation."""

import math

import pytest
import torch
import torch.nn.functional as F

from sirocco.config import preset
from sirocco.model import build_model
from sirocco.train.corpus import build, pydoc_topics
from sirocco.train.data import DataPosition, PackedStream, eval_batches, pack, tokenize
from sirocco.train.loop import LocalStep, Trainer
from sirocco.train.losses import IGNORE_INDEX, load_balancing_loss
from sirocco.train.recipe import Recipe, TrainRecipe
from sirocco.train.run import train, unigram_entropy
from sirocco.train.schedule import learning_rate

from fakes import ByteTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")      # tiny models: see conftest.py


ARCHS = {"mistral": preset("tiny", vocab_size=259, sliding_window=16, max_seq_len=128),
         "mixtral": preset("tiny-moe", vocab_size=259, max_seq_len=128)}


@pytest.fixture(scope="module")
def texts():
    """About 1200 characters of the pydoc topics, in paragraphs: a corpus small enough to learn in seconds."""
    paragraphs = [p for text, _ in pydoc_topics() for p in text.split("\n\n") if len(p) > 80]
    out, size = [], 0
    for p in paragraphs:
        out.append(p)
        size += len(p)
        if size > 1_200:
            break
    return out


def trainer(args, docs, seed=0, **recipe):
    model = build_model(args, seed=seed)
    r = TrainRecipe(**{"lr": 3e-3, "warmup": 5, "steps": 100, "autocast": "off", "weight_decay": 0.0, **recipe})
    return Trainer(LocalStep(model, r), r, PackedStream(docs, 64, r.batch_rows, seed), [])


@pytest.mark.parametrize("arch", list(ARCHS))
def test_loss_falls_well_below_the_unigram_entropy(arch, texts):
    """A model that learns nothing from context cannot beat the unigram entropy; a few seconds of training must."""
    docs = tokenize(texts, ByteTokenizer())
    baseline = unigram_entropy(docs)
    args = ARCHS[arch].replace(dim=128, hidden_dim=256, head_dim=32)
    model = build_model(args, seed=0)
    recipe = TrainRecipe(lr=5e-3, warmup=5, steps=80, batch_rows=4, autocast="off", weight_decay=0.0)
    t = Trainer(LocalStep(model, recipe), recipe, PackedStream(docs, 128, recipe.batch_rows, 0),
                eval_batches(docs, 128, 8))
    assert t.evaluate() == pytest.approx(math.log(259), abs=0.3)      # at first: about uniform over the vocabulary
    for _ in range(recipe.steps):
        t.train_step()
    assert t.evaluate() < baseline - 0.5, baseline


def test_load_balancing_loss_is_k_for_even_routing_and_rises_when_skewed():
    E, k = 4, 2
    even = torch.zeros(8, E)
    for t in range(8):                          # token t prefers experts t and t+1: every expert chosen equally
        even[t, t % E] = even[t, (t + 1) % E] = 5.0
    assert float(load_balancing_loss(even, k)) == pytest.approx(k, abs=1e-5)
    skewed = torch.zeros(8, E)
    skewed[:, 0] = skewed[:, 1] = 5.0           # every token: experts 0 and 1
    assert float(load_balancing_loss(skewed, k)) > 1.9 * k
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4096, E, generator=g) * 0.1
    assert float(load_balancing_loss(logits, k)) == pytest.approx(k, rel=0.02)
    # against the definition written out per expert
    probs = logits.softmax(-1)
    chosen = logits.topk(k, -1).indices
    ref = E * sum((chosen == e).float().sum() / len(logits) * probs[:, e].mean() for e in range(E))
    assert float(load_balancing_loss(logits, k)) == pytest.approx(float(ref), rel=1e-5)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_gradient_accumulation_equals_one_larger_batch(arch, texts):
    """m micro-batches of B rows, accumulated, make the same update as one batch of m*B rows (clipping and
    AdamW included). For MoE without the balance term: it is a mean per micro-batch, not per batch."""
    docs = tokenize(texts, ByteTokenizer())
    common = dict(clip=0.05, aux_loss_coef=0.0)                 # a clip that acts
    a = trainer(ARCHS[arch], docs, batch_rows=2, accum=3, **common)
    b = trainer(ARCHS[arch], docs, batch_rows=6, accum=1, **common)
    for _ in range(2):
        ra, rb = a.train_step(), b.train_step()
        assert ra.loss == pytest.approx(rb.loss, rel=1e-5)
        assert ra.grad_norm == pytest.approx(rb.grad_norm, rel=1e-4)
        assert ra.grad_norm > common["clip"]
    assert a.position == b.position
    for (name, pa), pb in zip(a.step_fn.model.named_parameters(), b.step_fn.model.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=2e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_packed_rows_give_the_loss_and_gradients_of_the_documents_one_by_one(arch):
    """Documents packed into rows (block-diagonal causal, windowed) against each document alone."""
    g = torch.Generator().manual_seed(5)
    lengths = [6, 11, 8, 9]                         # pairs per document: rows of 17 hold 6+11 and 8+9
    docs = [[1] + torch.randint(3, 259, (n - 1,), generator=g).tolist() + [2] for n in lengths]
    batch = pack(docs, 17)
    assert batch.tokens.shape == (2, 17) and batch.lengths == lengths
    args = ARCHS[arch]
    model = build_model(args, seed=1)
    ce, aux = LocalStep(model, TrainRecipe(autocast="off")).forward(batch)
    (ce / batch.num_targets).backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    total = 0.0
    for doc in docs:
        x, y = torch.tensor(doc[:-1]), torch.tensor(doc[1:])
        total = total + F.cross_entropy(model(x, [len(x)]), y, reduction="sum")
    (total / sum(lengths)).backward()
    torch.testing.assert_close(ce, total, rtol=1e-5, atol=1e-5)
    for (name, p), g_packed in zip(model.named_parameters(), packed_grads, strict=True):
        torch.testing.assert_close(g_packed, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert (aux is not None) == (args.moe is not None)


def test_pack_layout_cuts_documents_and_fills_the_last_row():
    docs = [[1, 10, 11, 12, 2], [1, 20, 21, 2], [1, 30, 31, 32, 33, 34, 2]]
    b = pack(docs, 8)
    assert b.tokens.tolist() == [[1, 10, 11, 12, 1, 20, 21, 1], [30, 31, 32, 33, 34, 0, 0, 0]]
    assert b.targets.tolist() == [[10, 11, 12, 2, 20, 21, 2, 30],
                                  [31, 32, 33, 34, 2, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    assert b.positions.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 2, 3, 4, 0, 1, 2]]
    assert b.lengths == [4, 3, 1, 5, 3] and b.num_targets == 13


def test_stream_is_reproducible_and_reshuffles_each_epoch():
    docs = [[1] + [i] * (3 + i % 5) + [2] for i in range(3, 40)]
    s1, s2 = PackedStream(docs, 16, 2, seed=7), PackedStream(docs, 16, 2, seed=7)
    at = DataPosition()
    seen = []
    while at.epoch < 2:
        b1, nxt = s1.next(at)
        b2, _ = s2.next(at)
        assert torch.equal(b1.tokens, b2.tokens)
        seen.append((at.epoch, b1.tokens))
        at = nxt
    epoch0 = torch.cat([t for e, t in seen if e == 0])
    epoch1 = torch.cat([t for e, t in seen if e == 1])
    assert not torch.equal(epoch0, epoch1)
    assert not torch.equal(PackedStream(docs, 16, 2, seed=8).epoch(0).tokens, s1.epoch(0).tokens)


def test_learning_rate_schedule():
    assert learning_rate(0, 1.0, 10, 110, 0.1) == pytest.approx(0.1)
    assert learning_rate(9, 1.0, 10, 110, 0.1) == pytest.approx(1.0)
    assert learning_rate(60, 1.0, 10, 110, 0.1) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2)))
    assert learning_rate(110, 1.0, 10, 110, 0.1) == pytest.approx(0.1)
    assert learning_rate(500, 1.0, 10, 110, 0.1) == pytest.approx(0.1)


def small_recipe(arch):
    r = Recipe()
    r.data.seq_len = 32
    r.model.preset = "tiny" if arch == "mistral" else "tiny-moe"
    r.model.max_seq_len = 128
    r.train = TrainRecipe(steps=6, batch_rows=2, accum=2, warmup=2, eval_every=2, eval_rows=4, save_every=0,
                          autocast="off")
    return r


@pytest.mark.parametrize("arch", list(ARCHS))
def test_resumed_training_continues_exactly(arch, texts, tmp_path):
    corpus = build(((t, f"p{i}") for i, t in enumerate(texts)), val_fraction=0.5)
    tok = ByteTokenizer()
    full = train(small_recipe(arch), tmp_path / "full", corpus=corpus, tokenizer=tok, progress=False)
    train(small_recipe(arch), tmp_path / "cut", corpus=corpus, tokenizer=tok, progress=False, stop_at=3)
    resumed = train(small_recipe(arch), tmp_path / "cut", corpus=corpus, tokenizer=tok, progress=False, resume=True)
    import json
    a = json.loads((tmp_path / "full" / "trainer_state.json").read_text())
    b = json.loads((tmp_path / "cut" / "trainer_state.json").read_text())
    assert len(a["history"]["val"]) == 3 and corpus.val
    assert [s for s, _ in b["history"]["train"]] == list(range(1, 7))
    assert b["history"]["train"] == a["history"]["train"]           # same losses, bit for bit
    assert b["history"]["val"] == a["history"]["val"]
    assert b["data"] == a["data"] and resumed["steps"] == full["steps"] == 6
    from safetensors.torch import load_file
    wa = load_file(tmp_path / "full" / "consolidated.safetensors")
    wb = load_file(tmp_path / "cut" / "consolidated.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (tmp_path / "cut" / "loss.png").stat().st_size > 1000


def test_a_finished_run_is_not_overwritten(texts, tmp_path):
    corpus = build(((t, f"p{i}") for i, t in enumerate(texts)), val_fraction=0.5)
    recipe = small_recipe("mistral")
    recipe.train.steps = 1
    train(recipe, tmp_path, corpus=corpus, tokenizer=ByteTokenizer(), progress=False)
    from sirocco.errors import SiroccoError
    with pytest.raises(SiroccoError, match="--resume"):
        train(recipe, tmp_path, corpus=corpus, tokenizer=ByteTokenizer(), progress=False)


def test_bf16_autocast_step_matches_fp32_closely(texts):
    """bf16 autocast (the dense bundled model's recipe) computes the same step to bf16 precision; the loss is
    reduced in fp32."""
    docs = tokenize(texts, ByteTokenizer())
    fp32 = trainer(ARCHS["mistral"], docs, batch_rows=4)
    bf16 = trainer(ARCHS["mistral"], docs, batch_rows=4, autocast="bf16")
    assert bf16.step_fn.autocast and not fp32.step_fn.autocast
    for _ in range(3):
        a, b = fp32.train_step(), bf16.train_step()
        assert b.loss == pytest.approx(a.loss, abs=0.03)
    assert all(p.dtype == torch.float32 for p in bf16.step_fn.model.parameters())     # master weights stay fp32
