"""route.convert on tiny GGUF files the tests write themselves with gguf.GGUFWriter.

References: the `gguf` package's dequantization of the source tensors, llama.cpp's q/k permutation (re-written
here from convert_hf_to_gguf.py), and transformers, which loads both the GGUF itself and our converted output.
"""
import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

from route.convert import ConversionError, convert, main

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 64, 4, 2, 128, 2
HEAD_DIM = HIDDEN // HEADS
CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")
CORPUS = ["SELECT count(*) FROM singer WHERE age > 20 ORDER BY name DESC LIMIT 3;",
          "How many singers do we have? What is the average age of all singers from France?",
          "the theory of the thing: there they then threw the three thermoses"] * 10
TEXTS = ["How many singers do we have?", "SELECT name FROM singer WHERE age > 30;", "  two  spaces\n\nand\tlines",
         "digits 1234567 and 'quotes' they're", "<|im_start|>user\nhi<|im_end|>\n", "üñíçødé ✓"]


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: the reordering the converter must undo."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_vocab(specials_first: bool):
    """A byte-level BPE vocabulary trained on a few lines, as GGUF token list, token types and merges."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials if specials_first else [],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    if not specials_first:  # Qwen's layout: specials after the BPE tokens
        tokens += specials
    types = [3 if t in specials else 1 for t in tokens]
    tokens.append("<tool_call>")  # a user-defined token (type 4), matched whole but not special
    types.append(4)
    return tokens, types, merges


def write_gguf(path, arch="qwen2", tied="twice", rope_freqs=None, pre=None, tokenizer_model="gpt2", seed=0,
               extra_tensor=None):
    """A 2-layer GGUF in the style llama.cpp writes for `arch`. Returns the HF-layout fp32 weights it encodes
    (before quantization) and the GGUF tensor types used, so tests can check the conversion against them.

    tied: "twice"  -> token_embd (Q8_0) and output (F16) hold the same matrix, as Qwen's file does;
          "once"   -> token_embd only (a tied model written the usual way);
          "untied" -> an independent output matrix.
    """
    rng = np.random.default_rng(seed)
    tokens, types, merges = tiny_vocab(specials_first=arch == "llama")
    vocab = len(tokens)
    hf, ggml = {}, {}  # HF name -> fp32 weights; GGUF name -> (array to write, quant type)

    def add(gguf_name, hf_name, w, qtype):
        hf[hf_name] = w
        stored = w
        kind = gguf_name.split(".")[-2]
        if arch == "llama" and kind in ("attn_q", "attn_k"):
            stored = llama_cpp_permute(w, HEADS if kind == "attn_q" else KV_HEADS)
        ggml[gguf_name] = (stored, qtype)

    r = lambda *shape: rng.standard_normal(shape).astype(np.float32) * 0.3  # noqa: E731
    embed = r(vocab, HIDDEN)
    add("token_embd.weight", "model.embed_tokens.weight", embed, Q.Q8_0)
    if tied == "twice":
        ggml["output.weight"] = (embed, Q.F16)
    elif tied == "untied":
        add("output.weight", "lm_head.weight", r(vocab, HIDDEN), Q.Q8_0)
    add("output_norm.weight", "model.norm.weight", 1 + r(HIDDEN), Q.F32)
    for i in range(LAYERS):
        p, b = f"blk.{i}.", f"model.layers.{i}."
        add(p + "attn_norm.weight", b + "input_layernorm.weight", 1 + r(HIDDEN), Q.F32)
        add(p + "ffn_norm.weight", b + "post_attention_layernorm.weight", 1 + r(HIDDEN), Q.F32)
        add(p + "attn_q.weight", b + "self_attn.q_proj.weight", r(HIDDEN, HIDDEN), Q.Q8_0)
        add(p + "attn_k.weight", b + "self_attn.k_proj.weight", r(KV_HEADS * HEAD_DIM, HIDDEN), Q.F16)
        add(p + "attn_v.weight", b + "self_attn.v_proj.weight", r(KV_HEADS * HEAD_DIM, HIDDEN), Q.Q8_0)
        add(p + "attn_output.weight", b + "self_attn.o_proj.weight", r(HIDDEN, HIDDEN), Q.F16)
        add(p + "ffn_gate.weight", b + "mlp.gate_proj.weight", r(FFN, HIDDEN), Q.Q8_0)
        add(p + "ffn_up.weight", b + "mlp.up_proj.weight", r(FFN, HIDDEN), Q.F16)
        add(p + "ffn_down.weight", b + "mlp.down_proj.weight", r(HIDDEN, FFN), Q.Q8_0)
        if arch == "qwen2":
            add(p + "attn_q.bias", b + "self_attn.q_proj.bias", r(HIDDEN), Q.F32)
            add(p + "attn_k.bias", b + "self_attn.k_proj.bias", r(KV_HEADS * HEAD_DIM), Q.F32)
            add(p + "attn_v.bias", b + "self_attn.v_proj.bias", r(KV_HEADS * HEAD_DIM), Q.F32)
    if rope_freqs is not None:
        ggml["rope_freqs.weight"] = (rope_freqs.astype(np.float32), Q.F32)
    if extra_tensor:
        ggml[extra_tensor] = (r(HIDDEN), Q.F32)

    w = GGUFWriter(str(path), arch)
    w.add_name(f"tiny {arch}")
    w.add_block_count(LAYERS)
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6 if arch == "qwen2" else 5e5)
    if arch == "llama":
        w.add_rope_dimension_count(HEAD_DIM)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre or ("qwen2" if arch == "qwen2" else "llama-bpe"))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    specials = {t: i for i, t in enumerate(tokens) if t.startswith("<|")}
    w.add_bos_token_id(specials["<|endoftext|>"] if arch == "qwen2" else specials["<|im_start|>"])
    w.add_eos_token_id(specials["<|im_end|>"])
    w.add_pad_token_id(specials["<|endoftext|>"])
    w.add_add_bos_token(arch == "llama")
    w.add_chat_template(CHATML)
    for name, (arr, qtype) in ggml.items():
        if qtype == Q.F32:
            w.add_tensor(name, arr)
        elif qtype == Q.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def source_tensors(path) -> dict[str, np.ndarray]:
    """The GGUF's tensors as the reference reader dequantizes them (in the file's own row order)."""
    return {t.name: dequantize(t.data, t.tensor_type).astype(np.float32) for t in GGUFReader(path).tensors}


def load_safetensors(d):
    from safetensors.torch import load_file
    return load_file(d / "model.safetensors")


def transformers_logits(model_dir, ids, gguf_file=None, embed_from_lm_head=False):
    import transformers

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kw).eval()
    if embed_from_lm_head:  # transformers unties a file holding both copies; give it our choice of copy
        with torch.no_grad():
            model.model.embed_tokens.weight.copy_(model.lm_head.weight)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen")
    hf = write_gguf(d / "tiny-qwen.gguf", "qwen2", tied="twice")
    out = convert(d / "tiny-qwen.gguf", d / "hf", dtype="fp32", progress=False)
    return d / "tiny-qwen.gguf", out, hf


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    hf = write_gguf(d / "tiny-llama.gguf", "llama", tied="untied")
    out = convert(d / "tiny-llama.gguf", d / "hf", dtype="fp32", progress=False)
    return d / "tiny-llama.gguf", out, hf


def test_qwen2_names_shapes_values(qwen):
    src, out, hf = qwen
    state = load_safetensors(out)
    assert set(state) == set(hf)  # tied: no lm_head.weight
    ref = source_tensors(src)
    # every tensor is exactly the reference reader's dequantization, under its HF name
    for gguf_name, w in ref.items():
        if gguf_name in ("token_embd.weight", "output.weight"):
            continue
        name = gguf_name.replace("blk.", "model.layers.").replace("output_norm", "model.norm")
        for a, b in [("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"),
                     ("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
                     ("attn_output", "self_attn.o_proj"), ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                     ("ffn_down", "mlp.down_proj")]:
            name = name.replace(f".{a}.", f".{b}.")
        assert state[name].shape == hf[name].shape, name
        torch.testing.assert_close(state[name], torch.from_numpy(w), rtol=0, atol=0, msg=name)
    # the embedding is stored twice (Q8_0 and F16): the model stays tied, from the more precise F16 copy
    torch.testing.assert_close(state["model.embed_tokens.weight"], torch.from_numpy(ref["output.weight"]),
                               rtol=0, atol=0)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True
    prov = json.loads((out / "provenance.json").read_text())
    assert "kept tied, from output.weight" in prov["tied_embeddings"]
    assert prov["tensor_types"] == {"F16": 1 + 3 * LAYERS, "F32": 1 + 5 * LAYERS, "Q8_0": 1 + 4 * LAYERS}
    assert len(prov["source_sha256"]) == 64


def test_qwen2_config_and_tokenizer_files(qwen):
    src, out, _ = qwen
    cfg = json.loads((out / "config.json").read_text())
    tokens = GGUFReader(src).fields["tokenizer.ggml.tokens"].contents()
    assert cfg["model_type"] == "qwen2" and cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (HIDDEN, FFN, LAYERS)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (HEADS, KV_HEADS)
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["rope_theta"] == 1e6 and cfg["max_position_embeddings"] == 512
    assert cfg["vocab_size"] == len(tokens) and cfg["torch_dtype"] == "float32"
    assert cfg["eos_token_id"] == tokens.index("<|im_end|>")
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tokens.index("<|im_end|>"), tokens.index("<|endoftext|>")]
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == CHATML and tok_cfg["eos_token"] == "<|im_end|>"
    assert tok_cfg["add_bos_token"] is False
    readme = (out / "README.md").read_text()
    assert "sha256" in readme and "quantiz" in readme


@pytest.mark.parametrize("family", ["qwen", "llama"])
def test_tokenizer_matches_transformers_gguf_tokenizer(family, request):
    import transformers
    from tokenizers import Tokenizer

    src, out, _ = request.getfixturevalue(family)
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    ref = transformers.AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=False).ids == ref(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ours.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text
    specials = ours.encode("<|im_start|>user\nhi<|im_end|><tool_call>", add_special_tokens=False).tokens
    assert specials[0] == "<|im_start|>" and specials[-2:] == ["<|im_end|>", "<tool_call>"]
    # transformers also reads the converted directory as a tokenizer, with the same ids
    loaded = transformers.AutoTokenizer.from_pretrained(out)
    assert loaded("SELECT name FROM singer", add_special_tokens=False)["input_ids"] == \
        ours.encode("SELECT name FROM singer", add_special_tokens=False).ids


def test_llama_unpermutes_q_k_and_keeps_output(llama):
    src, out, hf = llama
    state = load_safetensors(out)
    assert set(state) == set(hf)  # untied: lm_head.weight present
    for name, w in hf.items():  # the HF-order weights, quantized and back; Q8_0/F16 are row-local
        qtype = Q.Q8_0 if name.endswith(("q_proj.weight", "v_proj.weight", "gate_proj.weight", "down_proj.weight",
                                         "embed_tokens.weight", "lm_head.weight")) else None
        expected = dequantize(quantize(w, qtype), qtype) if qtype else w
        if name.endswith(("k_proj.weight", "o_proj.weight", "up_proj.weight")):
            expected = w.astype(np.float16).astype(np.float32)
        torch.testing.assert_close(state[name], torch.from_numpy(expected), rtol=0, atol=0, msg=name)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is False
    assert cfg["head_dim"] == HEAD_DIM and cfg["attention_bias"] is False and cfg["rope_scaling"] is None
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is True
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.encode("hi").tokens[0] == "<|im_start|>"  # the file's BOS, added as add_bos_token says


@pytest.mark.parametrize("family", ["qwen", "llama"])
def test_logits_match_transformers(family, request):
    src, out, _ = request.getfixturevalue(family)
    ids = [5, 17, 42, 99, 3, 250, 7]
    ours_via_hf = transformers_logits(out, ids)
    ref = transformers_logits(src.parent, ids, gguf_file=src.name, embed_from_lm_head=family == "qwen")
    torch.testing.assert_close(ours_via_hf, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen", "llama"])
def test_loads_in_route_model(family, request):
    from route.weights import load_model

    _, out, _ = request.getfixturevalue(family)
    model = load_model(out)
    ids = [5, 17, 42, 99, 3, 250, 7]
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]
    torch.testing.assert_close(logits, transformers_logits(out, ids), rtol=1e-4, atol=1e-4)


def test_bf16_default(tmp_path):
    write_gguf(tmp_path / "m.gguf", "qwen2", tied="once")
    out = convert(tmp_path / "m.gguf", tmp_path / "hf", progress=False)
    state = load_safetensors(out)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["tie_word_embeddings"] is True
    assert "lm_head.weight" not in state


@pytest.mark.parametrize("low, high, original", [(1.0, 32.0, 4096), (1.0, 4.0, 8192)])
def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path, low, high, original):
    import transformers

    # what convert_hf_to_gguf.py writes as rope_freqs for a Llama-3.1-style rope_scaling
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": low, "high_freq_factor": high,
               "original_max_position_embeddings": original}
    freqs = 1.0 / (5e5 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM))
    wavelen = 2 * np.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    factors = np.where(wavelen < original / high, 1.0,
                       np.where(wavelen > original / low, 8.0, 1 / ((1 - smooth) / 8.0 + smooth)))
    write_gguf(tmp_path / "m.gguf", "llama", tied="once", rope_freqs=factors)
    out = convert(tmp_path / "m.gguf", tmp_path / "hf", dtype="fp32", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["rope_scaling"]["factor"] == 8.0
    # the recovered parameters give the same frequencies as the originals, in transformers' own formula
    init = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"]
    got = init(transformers.LlamaConfig(**cfg), "cpu")[0]
    torch.testing.assert_close(got, init(transformers.LlamaConfig(**{**cfg, "rope_scaling": scaling}), "cpu")[0])
    assert not torch.allclose(got, torch.tensor(freqs, dtype=got.dtype))  # and scaling did happen


def test_refuses_unknown_architecture(tmp_path):
    path = tmp_path / "phi.gguf"
    w = GGUFWriter(str(path), "phi3")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ConversionError, match=r"phi\.gguf: architecture 'phi3' is not supported"):
        convert(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"tokenizer_model": "llama"}, "tokenizer 'llama' is not supported"),
    ({"pre": "deepseek-coder"}, "pre-tokenizer 'deepseek-coder' is not supported"),
    ({"extra_tensor": "blk.0.attn_sinks.weight"}, "tensor 'blk.0.attn_sinks.weight' has no Hugging Face"),
])
def test_refuses_what_it_cannot_convert(tmp_path, kwargs, message):
    write_gguf(tmp_path / "m.gguf", "qwen2", tied="once", **kwargs)
    with pytest.raises(ConversionError, match=message) as e:
        convert(tmp_path / "m.gguf", tmp_path / "out", progress=False)
    assert str(tmp_path / "m.gguf") in str(e.value)
    assert list(tmp_path.iterdir()) == [tmp_path / "m.gguf"]  # no output, no temp dir left behind


def test_existing_output_is_left_alone(tmp_path):
    write_gguf(tmp_path / "m.gguf", "qwen2", tied="once")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        convert(tmp_path / "m.gguf", tmp_path / "out", progress=False)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]


def test_command_line(tmp_path, capsys):
    write_gguf(tmp_path / "m.gguf", "qwen2", tied="once")
    main([str(tmp_path / "m.gguf"), str(tmp_path / "out"), "--dtype", "fp32"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float32"
    with pytest.raises(SystemExit, match="error: .*already exists"):
        main([str(tmp_path / "m.gguf"), str(tmp_path / "out")])
