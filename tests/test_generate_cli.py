"""``sirocco generate`` end to end through ``sirocco.cli.main``: the random demo model with Mistral's real v1
tokenizer, plain and --json output."""

import json
import math
from pathlib import Path

import mistral_common
import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from sirocco.cli import main
from sirocco.tokenizer import load_tokenizer

V1 = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
FIELDS = {"index", "prompt", "prompt_tokens", "tokens", "text", "logprobs", "finish_reason"}


def run(capsys, *argv):
    code = main(["generate", "--model", "random-tiny", "--no-progress", *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err


def test_generate_streams_the_prompt_and_its_continuation(capsys, caplog):
    caplog.set_level("INFO", logger="sirocco")
    out, err = run(capsys, "--max-tokens", "5", "hello")
    assert out.startswith("hello") and out.endswith("\n") and len(out) > len("hello\n")
    assert f"tokenizer: loaded {V1}" in caplog.text
    assert "5 tokens generated" in err


def test_generate_json_fields(capsys):
    prompts = ["hello", "The sliding window, café 🙂"]
    out, _ = run(capsys, "--json", "--max-tokens", "5", "--ignore-eos", "--temperature", "0", *prompts)
    lines = out.splitlines()
    assert len(lines) == 2
    tok = load_tokenizer(V1)
    for i, (line, prompt) in enumerate(zip(lines, prompts, strict=True)):
        c = json.loads(line)
        assert set(c) == FIELDS
        assert c["index"] == i and c["prompt"] == prompt
        assert c["prompt_tokens"] == tok.encode(prompt) and c["prompt_tokens"][0] == tok.bos_id == 1
        assert len(c["tokens"]) == 5 and all(0 <= t < tok.vocab_size for t in c["tokens"])
        assert len(c["logprobs"]) == 5 and all(math.isfinite(lp) and lp <= 0 for lp in c["logprobs"])
        assert c["finish_reason"] == "length"
        assert c["text"] == tok.decode(c["tokens"])        # the streamed text is what the tokens decode to


def test_generate_chat_prompt_is_mistral_commons_encoding(capsys):
    out, _ = run(capsys, "--json", "--chat", "--max-tokens", "2", "--temperature", "0", "What is a sliding window?")
    c = json.loads(out)
    request = ChatCompletionRequest(messages=[{"role": "user", "content": "What is a sliding window?"}])
    assert c["prompt_tokens"] == MistralTokenizer.from_file(str(V1)).encode_chat_completion(request).tokens


def test_generate_reads_one_prompt_per_line_of_a_utf8_prompts_file(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n\n   \ncafé 🙂\n", encoding="utf-8")           # blank lines are no prompts
    out, _ = run(capsys, "--json", "--max-tokens", "2", "--prompts-file", str(prompts))
    assert [json.loads(line)["prompt"] for line in out.splitlines()] == ["hello", "café 🙂"]


def test_generate_json_schema_constrains_every_answer(capsys, tmp_path):
    import jsonschema
    schema = {"type": "object", "properties": {"word": {"type": "string", "maxLength": 8},
                                               "n": {"type": "integer", "minimum": 1, "maximum": 5}},
              "required": ["word", "n"]}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    code = main(["generate", "--model", "sirocco-tiny", "--no-progress", "--json", "--json-schema",
                 str(tmp_path / "s.json"), "--max-tokens", "100", "--temperature", "1", "Return a", "The with"])
    out, err = capsys.readouterr()
    assert code == 0, err
    for line in out.splitlines():
        c = json.loads(line)
        assert c["finish_reason"] == "stop"
        doc = json.loads(c["text"])
        jsonschema.validate(doc, schema)
        assert set(doc) == {"word", "n"}                   # read strictly: no other keys


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"), ("{not json", "is not valid JSON"), ("[1]", "must be a JSON object"),
    ('{"type": "object", "properties": {"a": {"not": {}}}}', "uses 'not', which sirocco cannot enforce"),
    ('{"type": "string", "format": "colour"}', "'format': 'colour'"), ('{"type": "nope"}', "nope"),
])
def test_a_bad_json_schema_file_is_refused_while_parsing(capsys, tmp_path, content, message):
    path = tmp_path / "schema.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exit:
        main(["generate", "--json-schema", str(path), "x"])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("sirocco generate: error: argument --json-schema:") and message in err, err
