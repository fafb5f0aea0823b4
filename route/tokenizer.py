"""Text <-> token ids through the `tokenizers` library, plus chat formatting written as plain code.

Checkpoints ship their chat format as a Jinja template; rather than bring in a template engine at run time we write
the two formats supported (ChatML for Qwen2 and SmolLM2, Llama-3's headers) by hand, and the tests check them
against the checkpoint's own template rendered by jinja2.
"""
import re
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from .files import read_json_file


def _token_text(tok) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as {"content": ...} dicts."""
    return tok.get("content") if isinstance(tok, dict) else tok


class Tokenizer:
    def __init__(self, tok: HFTokenizer, chat_template: str, eos_ids: list[int], bos: str | None,
                 source: str = "tokenizer"):
        self.tok, self.eos_ids, self.pad_id, self.bos = tok, eos_ids, eos_ids[0], bos
        if "<|im_start|>" in chat_template:
            self.format = "chatml"
        elif "<|start_header_id|>" in chat_template:
            self.format = "llama3"
        else:
            raise ValueError(f"{source}: unsupported chat template (neither ChatML nor Llama-3 headers)")
        # ChatML templates may inject a default system message when the conversation has none (Qwen2.5 does:
        # "You are Qwen, created by Alibaba Cloud..."). It is a literal in the template: read it from there.
        m = re.search(r"<\|im_start\|>system\\n([^'\"{}+]+?)<\|im_end\|>", chat_template)
        self.default_system = m.group(1) if m else None

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.exists():
            raise FileNotFoundError(f"{tok_file} not found")
        try:
            tok = HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception
            raise ValueError(f"{tok_file}: not a readable tokenizer file ({e})") from None
        settings = read_json_file(path / "tokenizer_config.json") if (path / "tokenizer_config.json").exists() else {}
        template = settings.get("chat_template") or ""
        if not template and (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        # EOS ids: a model may stop on several (Qwen2.5-Instruct: <|im_end|> and <|endoftext|>)
        eos: list[int] = []
        for f in ("generation_config.json", "config.json"):
            if (path / f).exists():
                e = read_json_file(path / f).get("eos_token_id")
                eos += e if isinstance(e, list) else [e] if e is not None else []
        eos_text = _token_text(settings.get("eos_token"))
        if eos_text and tok.token_to_id(eos_text) is not None:
            eos.append(tok.token_to_id(eos_text))
        eos = list(dict.fromkeys(eos))  # dedupe, keep order
        if not eos:
            raise ValueError(f"{path}: no EOS token id in generation_config.json, config.json or tokenizer_config.json")
        return cls(tok, template, eos, _token_text(settings.get("bos_token")), source=str(path))

    def encode(self, text: str) -> list[int]:
        # No automatic BOS/EOS: prompts are fully spelled out by `chat`, special tokens included.
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def encode_parts(self, prompts: list) -> list[list[list[int]]]:
        """The one tokenization of prompts, for training and inference: each prompt's list of per-part ids. A prompt
        is a string or a tuple of parts (strings or token-id lists), each encoded on its own, so the cuts are token
        boundaries whether or not a prefix comes from a cache (BPE merges across a cut: "')]" + "\n\n" != "')]\n\n")."""
        parts = [p if isinstance(p, tuple) else (p,) for p in prompts]
        encoded = iter(self.encode_batch([x for ps in parts for x in ps if isinstance(x, str)]))
        return [[next(encoded) if isinstance(x, str) else list(x) for x in ps] for ps in parts]

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    @property
    def end_of_turn(self) -> str:
        """What closes a turn in this chat format: the end of every answer, in training and in chat()."""
        return {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}[self.format]

    def chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render a conversation [{"role": ..., "content": ...}] the way the checkpoint's template does."""
        if self.format == "chatml":
            if self.default_system and messages and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": self.default_system}, *messages]
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}{self.end_of_turn}\n" for m in messages)
            return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
        # Llama-3: contents are trimmed by the template; BOS opens the conversation
        text = (self.bos or "") + "".join(
            f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}{self.end_of_turn}" for m in messages)
        return text + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")
