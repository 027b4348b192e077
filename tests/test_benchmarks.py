"""The benchmark scripts run end to end on their small shape (their figures are not checked: they are not tests)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.benchmark

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_paired_benchmark_quick(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH / "bench_paired.py"), "--quick", "--rounds", "2", "--json",
                          "--workdir", str(tmp_path), "--prefill-lens", "32,64"],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    assert [r["first"] for r in result["rounds"]] == ["transformers", "sirocco"]      # ABBA
    assert result["prefill_lens"] == [32, 64] and not result["moe"]
    for row in result["rounds"]:
        assert row["sirocco_prefill_32"] > 0 and row["transformers_prefill_64"] > 0
        assert row["transformers_decode"] > 0 and row["bandwidth"] > 0
    assert set(result["summary"]["prefill_ratio_64"]) == {"median", "min", "max"}
    assert "pre-fill 32 tokens: sirocco / transformers" in out.stderr


def test_serve_benchmark_quick(tmp_path):
    """The load benchmark end to end on the tiny shape: a real server on 127.0.0.1, transformers' padded batches,
    the single-client rounds and the targets table (the long-prompt case, two more servers, is left out)."""
    out = subprocess.run([sys.executable, str(BENCH / "bench_serve.py"), "--quick", "--skip-long", "--requests", "8",
                          "--rounds", "1", "--single-tokens", "8", "--json", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["load"]["requests"] == 8 and result["load"]["output_tokens"] == result["offline"]["output_tokens"]
    assert result["transformers_padded"]["output_tokens"] == result["offline"]["output_tokens"]
    assert len(result["single"]["rounds"]) == 1 and result["single"]["ratio_median"] > 0
    assert {t["target"].split(",")[0] for t in result["targets"]} >= {"server throughput"}
    assert len(result["targets"]) == 3 and "target server throughput" in out.stderr


def test_inside_benchmark_quick():
    """The inside panel's cost end to end on sirocco-tiny: a real server, a followed request and one beside it."""
    out = subprocess.run([sys.executable, str(BENCH / "bench_inside.py"), "--rounds", "1", "--tokens", "12", "--json"],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["median"]["steps_followed"] == 12 and result["solo_ratio"] > 0 and result["beside_ratio"] > 0
    assert result["engine"]["ratio"] > 0 and result["engine"]["record_ms_per_step"] > 0
    assert "followed request's decode" in out.stderr


def test_grammar_benchmark_quick(tmp_path):
    """Mask costs on the bundled vocabulary and the 8-row decode, constrained and not, on a small shape."""
    out = subprocess.run([sys.executable, str(BENCH / "bench_grammar.py"), "--quick", "--steps", "40", "--repeats",
                          "1", "--json", "--workdir", str(tmp_path)], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    row = result["masks"]["bundled (4096)"]
    assert row["string"]["allowed_median"] > 3000 and row["string"]["mask"]["median_us"] > 0
    assert row["nested"]["mask"]["p99_us"] >= row["nested"]["mask"]["median_us"]
    assert result["decode"]["rows"] == 8 and result["decode"]["constrained_tps"] > 0
    assert "constrained vs unconstrained" in out.stderr


def test_speculate_benchmark_quick(tmp_path):
    """The bundled model's repetitive and sampled prompts, plain against prompt lookup (the same tokens, checked
    by the script), and the verification cost on the small shape in bf16 and int4."""
    out = subprocess.run([sys.executable, str(BENCH / "bench_speculate.py"), "--quick", "--repeats", "1", "--json",
                          "--workdir", str(tmp_path)], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    for part in ("bundled", "sampled"):
        rows = result["results"][part]["rows"]
        assert len(rows) == 3 and all(r["same_output"] and r["speculative"]["tokens_per_s"] > 0 for r in rows)
    for fmt in ("bf16", "int4"):
        cost = result["results"]["cost"][fmt]
        assert len(cost["step_seconds"]) == 8 and cost["runs"]["p=1.0"]["accepted"] > 0
        assert cost["runs"]["p=0.0"]["accepted"] == 0
    assert len(result["targets"]) == 4 and "int4, k = 4, every draft right" in out.stderr


def test_gguf_types_benchmark_quick(tmp_path):
    """Each mix's perplexity cost through sirocco on the files it writes, on a one-layer random model (without
    --llama-cpp: llama.cpp is no dependency of the suite)."""
    out = subprocess.run([sys.executable, str(BENCH / "bench_gguf_types.py"), "--quick", "--json", "--workdir",
                          str(tmp_path)], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert list(result["rows"]) == ["f16", "q8_0", "q4_K_M"] and result["chunks"] == 16
    assert all(r["sirocco"]["perplexity"] > 1 and r["bits_per_weight"] > 4 for r in result["rows"].values())
    assert "| q4_K_M | " in out.stderr


def test_gguf_speed_benchmark_quick(tmp_path):
    """Each mix's pre-fill and decode rates through sirocco on the files ``sirocco quantize`` writes, with bf16 as
    the baseline and the bandwidth bound, on a small random model (without --llama-cpp)."""
    out = subprocess.run([sys.executable, str(BENCH / "bench_gguf_speed.py"), "--quick", "--json", "--workdir",
                          str(tmp_path)], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert list(result["summary"]) == ["bf16", "q8_0", "q4_K_M"] and len(result["rounds"]) == 1
    bf16, q8, q4 = (result["summary"][k] for k in ("bf16", "q8_0", "q4_K_M"))
    assert bf16["decode_read_bytes"] > q8["decode_read_bytes"] > q4["decode_read_bytes"] > 0
    for s in (bf16, q8, q4):
        assert s["sirocco_prefill_tokens_per_s"] > 0 and s["sirocco_decode_8_tokens_per_s"] > 0
        assert s["sirocco_fraction_of_bound"] > 0 and "llama_decode_1_tokens_per_s" not in s
    assert sorted(p.name.rsplit("-", 1)[1] for p in tmp_path.glob("*.gguf")) == ["q4_K_M.gguf", "q8_0.gguf"]
    assert "| q4_K_M | " in out.stderr


def test_prefix_benchmark_quick(tmp_path):
    """A chat's second turn on two servers, with and without the prefix store: the store's server reuses turn 1's
    prompt, the other pre-fills it all."""
    out = subprocess.run([sys.executable, str(BENCH / "bench_prefix.py"), "--quick", "--rounds", "1", "--json",
                          "--workdir", str(tmp_path)], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    [row] = result["rounds"]
    assert row["store"]["turn2"]["cached_tokens"] == row["store"]["turn1"]["prompt_tokens"] > 250
    assert row["cold"]["turn2"]["cached_tokens"] == 0 and row["store"]["turn1"]["cached_tokens"] == 0
    assert set(result["summary"]) >= {"turn2_over_turn1", "turn2_store_over_cold", "turn1_store_over_cold"}
    assert "turn 2 / turn 1 with the store" in out.stderr
