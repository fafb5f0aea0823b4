"""Tiny random-weight checkpoints that tests write themselves (CI downloads nothing).

transformers is the independent reference here: it builds and saves the checkpoint, and its forward pass is
what this project's model must reproduce.
"""
import torch

VOCAB = 384  # > 256 bytes so a byte-level BPE vocabulary with a few merges and special tokens fits


def tiny_config(family: str = "qwen2", **overrides):
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
                  initializer_range=0.25)  # large enough that greedy outputs vary, not echo
    if family == "qwen2":
        cfg = transformers.Qwen2Config(**{**common, "rope_theta": 1e6, "tie_word_embeddings": True, **overrides})
    elif family == "llama":
        cfg = transformers.LlamaConfig(**{**common, "rope_theta": 5e5, "tie_word_embeddings": False,
                                          "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 64},
                                          **overrides})
    else:
        raise ValueError(family)
    return cfg


def write_tiny(path, family: str = "qwen2", seed: int = 0, max_shard_size=None, **overrides):
    """Save a random transformers model of `family` to `path`; returns the transformers model (fp32, eval)."""
    import transformers

    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    cls = transformers.Qwen2ForCausalLM if family == "qwen2" else transformers.LlamaForCausalLM
    model = cls(cfg).eval()
    with torch.no_grad():  # HF initialises biases to zero; make them count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return model


# The chat templates of the checkpoints this project supports, as they ship in their tokenizer_config.json.
QWEN25_TEMPLATE = (
    "{%- if tools %}{{- raise_exception('tools are not used in these tests') }}{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SPECIALS = {"qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            "llama": ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>",
                      "<|end_header_id|>"]}
CORPUS = ["SELECT count(*) FROM singer WHERE age > 20 ORDER BY name DESC LIMIT 3;",
          "How many singers do we have? What is the average age of all singers from France?",
          "CREATE TABLE concert (concert_ID int, concert_Name text, Stadium_ID text, Year text)"] * 20


def write_tiny_tokenizer(path, family: str = "qwen2"):
    """A byte-level BPE tokenizer trained on a few SQL lines, with the family's special tokens at ids 0..n."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = SPECIALS[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(f"{path}/tokenizer.json")
    cfg = {"chat_template": QWEN25_TEMPLATE if family == "qwen2" else LLAMA3_TEMPLATE,
           "eos_token": specials[2], "bos_token": None if family == "qwen2" else specials[0]}
    with open(f"{path}/tokenizer_config.json", "w") as f:
        json.dump(cfg, f)
    with open(f"{path}/generation_config.json", "w") as f:
        json.dump({"eos_token_id": [2, 0] if family == "qwen2" else [2, 1]}, f)
    return tok


def write_tiny_dir(path, family: str = "qwen2"):
    """A tiny random model and its tokenizer written into `path`; returns path."""
    write_tiny(path, family)
    write_tiny_tokenizer(path, family)
    return path


def write_music_db(path):
    """A three-table SQLite database (country <- singer <- concert) for the SQL-side tests; returns path."""
    import sqlite3

    con = sqlite3.connect(path)
    con.executescript("""
        CREATE TABLE country (id INTEGER PRIMARY KEY, name TEXT);
        CREATE TABLE singer (id INTEGER PRIMARY KEY, name TEXT, age INTEGER, country_id INTEGER,
                             FOREIGN KEY (country_id) REFERENCES country(id));
        CREATE TABLE concert (id INTEGER PRIMARY KEY, singer_id INTEGER, year INTEGER,
                              FOREIGN KEY (singer_id) REFERENCES singer(id));
        INSERT INTO country VALUES (1, 'France'), (2, 'Peru');
        INSERT INTO singer VALUES (1, 'Ana', 30, 1), (2, 'Bo', 41, 2), (3, 'Cy', 25, 1);
        INSERT INTO concert VALUES (1, 1, 2014), (2, 3, 2015);
    """)
    con.commit()
    con.close()
    return path
