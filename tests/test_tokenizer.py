"""Tokenizer round trip, EOS ids, and chat formatting against the checkpoint's own Jinja template."""
import json

import jinja2
import pytest

from route.tokenizer import Tokenizer
from tiny import write_tiny_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "How many singers do we have?"}],
    [{"role": "system", "content": "You are a SQLite expert."}, {"role": "user", "content": "List all stadiums."}],
    [{"role": "system", "content": "Schema:\nCREATE TABLE t (a int)"}, {"role": "user", "content": " q1 "},
     {"role": "assistant", "content": "SELECT a FROM t"}, {"role": "user", "content": "and q2?\n"}],
]


def render_jinja(template: str, messages, add_generation_prompt: bool, bos: str | None) -> str:
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders chat templates
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token=bos or "", tools=None)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_chat_format_equals_jinja_template(family, tmp_path):
    write_tiny_tokenizer(tmp_path, family)
    tok = Tokenizer.from_dir(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    for messages in CONVERSATIONS:
        for gen in (True, False):
            assert tok.chat(messages, gen) == render_jinja(cfg["chat_template"], messages, gen, cfg["bos_token"])


def test_roundtrip_and_special_tokens(tmp_path):
    write_tiny_tokenizer(tmp_path, "qwen2")
    tok = Tokenizer.from_dir(tmp_path)
    for text in ["SELECT count(*) FROM singer WHERE age > 20;", "héllo wörld ✓ 数据库", "  two  spaces\n\nnl", ""]:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2  # special tokens in text map to their single ids
    assert tok.decode(ids) == "user\nhi"  # and are skipped when decoding
    assert tok.eos_ids == [2, 0]
    assert tok.default_system.startswith("You are Qwen")


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    write_tiny_tokenizer(tmp_path, "qwen2")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    with pytest.raises(ValueError, match="unsupported chat template"):
        Tokenizer.from_dir(tmp_path)
