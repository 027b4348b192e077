"""Pipeline-parallel training over 2 gloo ranks against one process accumulating the same micro-batches."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from sirocco.checkpoint import save_consolidated
from sirocco.checkpoint.config_files import args_to_params
from sirocco.config import preset
from sirocco.distributed.launch import DistContext, spawn_local
from sirocco.distributed.pipeline_train import (
    IGNORE_INDEX,
    PipelineStep,
    document_lengths,
)
from sirocco.distributed.stages import rank_stage
from sirocco.model import build_model
from sirocco.train.data import Batch
from sirocco.train.loop import LocalStep, evaluate
from sirocco.train.recipe import TrainRecipe

pytestmark = pytest.mark.slow          # every test spawns gloo ranks


ARGS = {"mistral": preset("tiny", vocab_size=259, sliding_window=6),
        "mixtral": preset("tiny-moe", vocab_size=259)}
SEED = 3
ROWS, COLS, MICRO = 8, 24, 4
LR = 1e-2
AUX = 0.02           # Mixtral's published load-balancing coefficient (no effect on the dense model)


def batch():
    """(B, T) tokens, targets and positions of rows packing documents of random lengths, and those lengths.
    Built from the lengths (not from the code under test); some targets are ignored."""
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(3, 259, (ROWS, COLS), generator=g)
    targets = torch.randint(3, 259, (ROWS, COLS), generator=g)
    targets[0, :5] = IGNORE_INDEX
    targets[5, -3:] = IGNORE_INDEX
    positions, lengths = [], []
    for _ in range(ROWS):
        cuts = sorted(set(torch.randint(1, COLS, (3,), generator=g).tolist()))
        row = [c - a for a, c in zip([0] + cuts, cuts + [COLS], strict=True)]
        lengths.append(row)
        positions.append([p for n in row for p in range(n)])
    return tokens, targets, torch.tensor(positions), lengths


def micro_batches():
    """The batch's ROWS rows cut into MICRO micro-batches, in order."""
    tokens, targets, positions, _ = batch()
    pieces = (t.split(ROWS // MICRO) for t in (tokens, targets, positions))
    return [Batch(*parts) for parts in zip(*pieces, strict=True)]


def save(step_fn, args, folder):
    """The whole model gathered on rank 0, which writes it as one consolidated checkpoint."""
    full = step_fn.full_state_dict()
    if full is not None:
        save_consolidated(full, args, folder)


def train_rank(ctx, args, folder):
    stage = rank_stage(ctx, args, seed=SEED)
    out = {}
    for schedule in ("1f1b", "gpipe"):                 # gpipe last: its gradients feed the steps below
        stage.zero_grad()
        step_fn = PipelineStep(stage, ctx, n_microbatches=MICRO, schedule=schedule, aux_loss_coef=AUX)
        ce, aux, tokens = step_fn.train_step(micro_batches())
        assert tokens == ROWS * COLS
        out[schedule] = (ce + aux, aux, {k: p.grad.clone() for k, p in stage.named_parameters()})
    save(step_fn, args, f"{folder}/initial")
    out["norm"] = step_fn.clip_grad_norm_(0.5)
    opt = torch.optim.AdamW(stage.parameters(), lr=LR)
    opt.step()
    save(step_fn, args, f"{folder}/trained")
    return out


def balance(router_logits, k):
    """Switch load-balancing loss of one layer, written out per expert."""
    E = router_logits.shape[1]
    probs = torch.softmax(router_logits.float(), dim=-1)
    chosen = torch.topk(router_logits, k, dim=-1).indices
    return E * sum((chosen == e).sum() / len(chosen) * probs[:, e].mean() for e in range(E))


def single_process(args):
    """Plain accumulation: per micro-batch of ROWS / MICRO rows, summed cross-entropy over the batch's target
    count (plus, for MoE, AUX times the layers' mean load balance over MICRO), backward; then clipping and one
    AdamW step."""
    model = build_model(args, seed=SEED)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    tokens, targets, _, lengths = batch()
    count = (targets != IGNORE_INDEX).sum()
    rows = ROWS // MICRO
    total = aux_total = 0.0
    for m in range(MICRO):
        sl = slice(m * rows, (m + 1) * rows)
        router = []
        logits = model(tokens[sl].flatten(), [n for row in lengths[sl] for n in row], router_logits=router)
        loss = F.cross_entropy(logits, targets[sl].flatten(), ignore_index=IGNORE_INDEX, reduction="sum") / count
        if args.moe is not None:
            aux = AUX * sum(balance(r, args.moe.num_experts_per_tok) for r in router) / args.n_layers / MICRO
            loss = loss + aux
            aux_total += float(aux.detach())
        loss.backward()
        total += float(loss.detach())
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5))
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    opt.step()
    return total, aux_total, grads, norm, initial, model.state_dict()


@pytest.fixture(scope="module", params=list(ARGS))
def trained(request, tmp_path_factory):
    name = request.param
    folder = tmp_path_factory.mktemp(name)
    results = spawn_local(train_rank, 2, (ARGS[name], str(folder)), timeout_s=60, deadline_s=90)
    for r in results:
        assert r.ok, f"rank {r.rank} failed: {r.error}"
    return name, folder, [r.value for r in results], single_process(ARGS[name])


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipeline_loss_and_gradients_equal_single_process_accumulation(trained, schedule):
    name, _, ranks, (loss, aux, grads, _, _, _) = trained
    assert (aux > 1e-3) == (name == "mixtral")
    seen = set()
    for r in ranks:
        rank_loss, rank_aux, rank_grads = r[schedule]
        assert rank_loss == pytest.approx(loss, rel=1e-5)          # the loss reaches every rank
        assert rank_aux == pytest.approx(aux, rel=1e-5, abs=1e-9)
        for k, g in rank_grads.items():
            torch.testing.assert_close(g, grads[k], atol=1e-6, rtol=1e-5)
        seen |= set(rank_grads)
    assert seen == set(grads)


def test_gradient_clipping_uses_the_norm_over_all_stages(trained):
    _, _, ranks, (_, _, _, norm, _, _) = trained
    for r in ranks:
        assert r["norm"] == pytest.approx(norm, rel=1e-5)


def test_checkpoint_is_the_file_a_single_process_writes(trained, tmp_path):
    name, folder, _, (_, _, _, _, initial, final) = trained
    save_file({k: v.contiguous() for k, v in initial.items()}, str(tmp_path / "single.safetensors"),
              metadata={"format": "pt"})
    assert (folder / "initial" / "consolidated.safetensors").read_bytes() == \
        (tmp_path / "single.safetensors").read_bytes()
    assert json.loads((folder / "initial" / "params.json").read_text()) == args_to_params(ARGS[name])
    trained_sd = load_file(str(folder / "trained" / "consolidated.safetensors"))
    assert set(trained_sd) == set(final)
    for k, v in final.items():                        # after clipping and one AdamW step on every stage
        torch.testing.assert_close(trained_sd[k], v, atol=1e-5, rtol=1e-5)
        assert not torch.equal(trained_sd[k], initial[k])


def evaluate_rank(ctx, args, batches):
    stage = rank_stage(ctx, args, seed=SEED)
    step_fn = PipelineStep(stage, ctx, n_microbatches=MICRO)
    return evaluate(step_fn, batches), step_fn.num_parameters(), stage.training


@pytest.mark.parametrize("name", list(ARGS))
def test_pipeline_step_evaluates_as_the_one_process_step(name):
    """The training loop's one evaluation over the pipeline's step function: the stages forward only, batches
    of uneven rows, the same loss and parameter count on every rank as one process on the same weights."""
    tokens, targets, positions, _ = batch()
    batches = [Batch(tokens[:5], targets[:5], positions[:5]), Batch(tokens[5:], targets[5:], positions[5:])]
    results = spawn_local(evaluate_rank, 2, (ARGS[name], batches), timeout_s=60, deadline_s=90)
    for r in results:
        assert r.ok, f"rank {r.rank} failed: {r.error}"
    one = LocalStep(build_model(ARGS[name], seed=SEED), TrainRecipe(autocast="off"))
    expected = evaluate(one, batches)
    assert expected > 1.0
    for r in results:
        loss, n_params, training = r.value
        assert loss == pytest.approx(expected, rel=1e-5)
        assert n_params == one.num_parameters() and training


def test_a_step_of_the_wrong_micro_batches_is_refused_naming_them():
    """Checked before any message is sent, so one process without peers sees it (a whole model stands in for
    the stage: nothing runs through it)."""
    ctx = DistContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), process_group="gloo",
                      timeout_s=1.0)
    model = build_model(ARGS["mistral"], seed=SEED)
    step_fn = PipelineStep(model, ctx, n_microbatches=MICRO)
    batches = micro_batches()
    with pytest.raises(ValueError, match=r"needs 4 micro-batches .* got 3 with shapes \[\(2, 24\)\]"):
        step_fn.train_step(batches[:3])
    uneven = batches[:3] + [Batch(*(t[:1] for t in (batches[3].tokens, batches[3].targets, batches[3].positions)))]
    with pytest.raises(ValueError, match=r"got 4 with shapes \[\(1, 24\), \(2, 24\)\]"):
        step_fn.train_step(uneven)
    with pytest.raises(ValueError, match="unknown pipeline schedule 'zigzag'"):
        PipelineStep(model, ctx, schedule="zigzag")


def test_document_lengths_from_positions():
    _, _, positions, lengths = batch()
    assert document_lengths(positions) == [n for row in lengths for n in row]
    with pytest.raises(ValueError, match="every row must start a document"):
        document_lengths(torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="row 0, column 2 has 5, expected 2"):
        document_lengths(torch.tensor([[0, 1, 5]]))


# -- the train verb over 2 ranks -----------------------------------------------------------------------------------
DOCS = [f"The sliding window of layer {i} keeps the last {4 * i + 3} keys; a rolling buffer cache holds them. "
        f"Mixture of experts number {i % 5} routes each token to two of its experts." for i in range(40)]


def train_command(flags):
    """Standard output and exit code of ``sirocco train`` with these flags (in this process)."""
    import contextlib
    import io

    from sirocco.cli import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["train", *flags])
    return code, out.getvalue()


def train_command_rank(ctx, flags):
    return train_command(flags)


@pytest.mark.parametrize("preset_name,schedule", [("tiny", "gpipe"), ("tiny-moe", "1f1b")])
def test_train_command_over_two_ranks_equals_one_process(tmp_path, preset_name, schedule):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, text in enumerate(DOCS):
        (docs / f"{i:02d}.txt").write_text(text)
    flags = ["--corpus", str(docs), "--seq-len", "32", "--steps", "3", "--batch-rows", "2", "--accum", "4",
             "--set", f"model.preset={preset_name}", "--set", "model.max_seq_len=64", "--set", "train.warmup=1",
             "--set", "train.eval_every=2", "--set", "data.val_fraction=0.2", "--set", "train.aux_loss_coef=0.02",
             "--set", "train.clip=0.5", "--no-progress", "--json"]
    pp = tmp_path / "pp"
    results = spawn_local(train_command_rank, 2, (flags + ["--out", str(pp), "--vocab-size", "300",
                                                           "--pipeline-ranks", "2", "--pipeline-schedule", schedule],),
                          timeout_s=60, deadline_s=120)
    for r in results:
        assert r.ok, f"rank {r.rank} failed: {r.error}"
    (code0, out0), (code1, out1) = [r.value for r in results]
    assert code0 == code1 == 0 and out1 == ""
    sharded = json.loads(out0)
    one = tmp_path / "one"          # one process, the tokenizer rank 0 trained
    code, text = train_command(flags + ["--out", str(one), "--tokenizer", str(pp / "tokenizer.model")])
    assert code == 0
    single = json.loads(text)
    history = json.loads((one / "trainer_state.json").read_text())["history"]
    assert sharded["steps"] == single["steps"] == 3
    torch.testing.assert_close(torch.tensor(sharded["history"]["train"]), torch.tensor(history["train"]),
                               atol=1e-5, rtol=1e-5)
    assert [s for s, _ in sharded["history"]["val"]] == [2, 3]
    torch.testing.assert_close(sharded["val_loss"], single["val_loss"], atol=1e-5, rtol=1e-5)
    # the checkpoint is the files one process writes, with the same weights
    assert json.loads((pp / "params.json").read_text()) == json.loads((one / "params.json").read_text())
    a, b = load_file(pp / "consolidated.safetensors"), load_file(one / "consolidated.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)
    for name in ("tokenizer.model", "recipe.toml", "loss.png"):
        assert (pp / name).is_file(), name
