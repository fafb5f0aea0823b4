"""The command-line tools, run as a user runs them: `python infer.py ...` and `python train.py ...` in a
subprocess, on the demo data (data/demo), with a tiny random model the test writes (CI downloads nothing).

What decides each check is outside the code under test: the JSONL traces infer.py writes, SQLite run on the
trace's SQL, the files train.py leaves, token counts from the `tokenizers` library. Messages are matched
loosely (a keyword, the name of the file) so that rewording them does not break a test; a traceback is never
an acceptable way to report a user's mistake.

One slow test runs infer.py with the real default model and the adapter shipped in adapters/.
"""
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny import write_music_db, write_tiny_dir

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"


def cli(script: str, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    return proc


def cli_all(*calls: tuple) -> list[subprocess.CompletedProcess]:
    """Several independent invocations at once (each is mostly Python and torch starting up)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for script, *args in calls]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def user_error(proc: subprocess.CompletedProcess, *words: str):
    """A clean failure: non-zero exit, an error message naming `words`, no traceback."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert "error" in proc.stderr.lower(), proc.stderr[-2000:]
    for w in words:
        assert w in proc.stderr, (w, proc.stderr[-2000:])


def traces(path: Path) -> tuple[list[dict], dict]:
    lines = [json.loads(ln) for ln in path.read_text().splitlines()]
    assert "summary" in lines[-1]
    return lines[:-1], lines[-1]["summary"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    return write_tiny_dir(path)


@pytest.fixture(scope="module")
def music(tmp_path_factory):
    return write_music_db(tmp_path_factory.mktemp("db") / "music.sqlite")


def infer_args(tiny, *args) -> tuple:
    return ("infer.py", "--model", tiny, "--dtype", "fp32", "--device", "cpu", "--quiet", *args)


def infer(tiny, *args):
    return cli(*infer_args(tiny, *args))


# -- infer.py ---------------------------------------------------------------------------------------------

def test_infer_db_and_question_go_together(tiny, music, tmp_path):
    q = "How many singers?"
    # (--db alone is not an error: it opens the interactive session, tests/test_session.py)
    cases = {"--question ": ["--db", music, "--question", "   "],
             "--db": ["--question", q], "missing.sqlite": ["--db", tmp_path / "missing.sqlite", "--question", q]}
    for named, proc in zip(cases, cli_all(*(infer_args(tiny, *a) for a in cases.values()))):
        user_error(proc, named.strip())


def test_infer_bad_data_exits_with_an_error(tiny, tmp_path):
    """The error-exit wrapper: bad paths and files end with a message naming them, not a traceback."""
    cases = {"nowhere": ["--data", tmp_path / "nowhere"], "nosuch.json": ["--data", DEMO, "--split", "nosuch.json"],
             "xx": ["--data", DEMO, "--limit", 1, "--steps", "sl,xx"]}
    for named, proc in zip(cases, cli_all(*(infer_args(tiny, *a) for a in cases.values()))):
        user_error(proc, named)


def test_infer_own_database_writes_the_out_file(tiny, music, tmp_path):
    out = tmp_path / "traces.jsonl"
    proc = ok(infer(tiny, "--db", music, "--question", "  How many singers do we have?  ", "--steps", "none",
                    "--out", out))
    rows, summary = traces(out)
    assert len(rows) == 1
    t = rows[0]
    assert t["question"] == "How many singers do we have?" and t["db_id"] == "music"
    assert summary["steps"] == [] and summary["ex"] is None  # plain text-to-SQL; no gold SQL to score
    assert t["sl_answer"] == t["nc"] == t["cw"] == "" and t["sql"] == t["ts_sql"]
    # the trace's outcome is SQLite's own verdict on the final SQL
    con = sqlite3.connect(f"file:{music}?mode=ro", uri=True)
    try:
        want = [list(r) for r in con.execute(t["sql"]).fetchall()[:20]]
    except (sqlite3.Error, ValueError):
        assert t["error"] and t["rows"] == []
    else:
        assert t["error"] is None and t["rows"] == want
    assert "EX" not in proc.stdout  # nothing to score


def test_infer_steps(tiny, tmp_path):
    """--steps picks the MCP steps ('none': plain text-to-SQL, as without --mcp); the traces show which ran."""
    ran = {}
    runs = {"default": [], "none": ["--steps", "none"], "sl,nc": ["--steps", "sl,,nc"], "mcp": ["--mcp"]}
    procs = cli_all(*(infer_args(tiny, "--data", DEMO, "--limit", 2, "--out", tmp_path / f"{i}.jsonl", *flags)
                      for i, flags in enumerate(runs.values())))
    for i, (name, proc) in enumerate(zip(runs, procs)):
        ok(proc)
        rows, summary = traces(tmp_path / f"{i}.jsonl")
        assert len(rows) == 2 and [r["question"] for r in rows] == [e["question"] for e in
                                                                    json.loads((DEMO / "dev.json").read_text())[:2]]
        assert 0 <= summary["ex"] <= 1  # the demo questions have gold SQL: scored
        # what each step leaves in a trace (a random model's SQL fails to run, so CW is always called for)
        ran[name] = (summary["steps"], {s for s, field in (("sl", "sl_answer"), ("nc", "nc"), ("cw", "cw"))
                                        if all(r[field] for r in rows)})
    assert ran["default"] == ran["none"] == ([], set())
    assert ran["sl,nc"] == (["sl", "nc"], {"sl", "nc"})
    assert ran["mcp"] == (["sl", "nc", "cw"], {"sl", "nc", "cw"})


@pytest.fixture(scope="module")
def tiny_adapter(tiny, tmp_path_factory):
    """A LoRA adapter for the tiny model with random (trained-looking) weights, saved in PEFT format."""
    from route.lora import add_lora, lora_modules, save_adapter
    from route.weights import load_model

    path = tmp_path_factory.mktemp("adapter")
    model = add_lora(load_model(tiny), r=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
    save_adapter(model, path, tiny)
    return path


def test_infer_fewshot_auto(tiny, tiny_adapter, tmp_path):
    """--fewshot auto: zero-shot prompts with a fine-tuned adapter, few-shot without. Greedy decoding is
    deterministic, so 'auto' must give exactly the answers of the setting it stands for, and not the other's."""
    runs = [(True, "auto"), (True, "no"), (False, "auto"), (False, "yes"), (False, "no")]
    procs = cli_all(*(infer_args(tiny, "--data", DEMO, "--limit", 2, "--steps", "sl", "--fewshot", f,
                                 "--out", tmp_path / f"{adapter}-{f}.jsonl",
                                 *(["--adapter", tiny_adapter] if adapter else [])) for adapter, f in runs))
    got = {}
    for (adapter, f), proc in zip(runs, procs):
        ok(proc)
        got[adapter, f] = [(r["sl_answer"], r["sql"]) for r in traces(tmp_path / f"{adapter}-{f}.jsonl")[0]]
    assert got[True, "auto"] == got[True, "no"]
    assert got[False, "auto"] == got[False, "yes"] != got[False, "no"]  # (the prompts do differ)
    assert got[True, "no"] != got[False, "no"]  # the adapter was loaded and changes the model


# -- train.py ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_train(tmp_path_factory):
    """The demo data laid out as a training split (Spider's train_spider.json + train_others.json)."""
    root = tmp_path_factory.mktemp("demo")
    shutil.copy(DEMO / "tables.json", root / "tables.json")
    shutil.copy(DEMO / "dev.json", root / "train_spider.json")
    (root / "train_others.json").write_text("[]")
    (root / "database").symlink_to(DEMO / "database")
    return root


def train_args(tiny, data, msft, out, *args) -> tuple:
    return ("--model", tiny, "--data", data, "--msft", msft, "--out", out, "--limit", 0, "--dtype", "fp32",
            "--batch-tokens", 4096, *args)


def train(tiny, data, msft, out, *args):
    return cli("train.py", *train_args(tiny, data, msft, out, *args))


def lengths(tiny, path: Path, tasks=("ts", "sl", "nc", "cw")) -> list[int]:
    """Token count of each record (prompt + answer + end of turn), by the tokenizers library itself."""
    from tokenizers import Tokenizer as HFTokenizer

    from route import prompts
    from route.tokenizer import Tokenizer

    tok, hf = Tokenizer.from_dir(tiny), HFTokenizer.from_file(str(tiny / "tokenizer.json"))
    out = []
    for r in map(json.loads, path.read_text().splitlines()):
        if r["task"] in tasks:
            prompt = prompts.render(tok, r["messages"], r["answer_start"])
            n = len(hf.encode(prompt, add_special_tokens=False).ids)
            out.append(n + len(hf.encode(r["target"] + "<|im_end|>", add_special_tokens=False).ids))
    return out


@pytest.fixture(scope="module")
def trained(tiny, demo_train, tmp_path_factory):
    """train.py building the MSFT data from the demo questions, then training 3 steps on all of it, one record
    per row (--no-pack) so that its examples can be counted against the records (the other runs pack)."""
    root = tmp_path_factory.mktemp("train")
    proc = ok(train(tiny, demo_train, root / "msft", root / "run", "--max-steps", 3, "--save-every", 0,
                    "--eval-every", 0, "--max-len", 100_000, "--no-pack"))
    return root / "msft", root / "run", proc


def test_train_builds_the_data_and_writes_an_adapter(tiny, demo_train, trained, tmp_path):
    msft, run, proc = trained
    n = lengths(tiny, msft / "train.jsonl")
    records = [json.loads(ln) for ln in (msft / "train.jsonl").read_text().splitlines()]
    assert {r["task"] for r in records} == {"ts", "sl", "nc", "cw"}
    assert {r["messages"][1]["content"].split("### Question: ")[1].split("\n")[0] for r in records} <= \
        {e["question"] for e in json.loads((DEMO / "dev.json").read_text())}
    assert f"{len(n)} training" in proc.stdout
    assert not re.search(r"dropped \d+ of \d+ examples", proc.stdout + proc.stderr)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["meta"]["examples"] == len(n)
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 3]  # three steps, then the held-out loss at the end

    # the adapter: PEFT format, and it changes the model (LoRA's B starts at zero: trained, it is not)
    from route.lora import load_adapter
    from route.weights import load_model
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == str(tiny)
    x = torch.randint(0, 384, (1, 12))
    with torch.no_grad():
        assert not torch.equal(load_adapter(load_model(tiny), run / "adapter")(x), load_model(tiny)(x))

    # an unknown task stops it before anything is built
    user_error(train(tiny, demo_train, tmp_path / "msft", tmp_path / "x", "--tasks", "ts,xx"), "xx")
    assert not (tmp_path / "msft").exists()


def test_train_drops_long_examples(tiny, demo_train, trained, tmp_path):
    """A max_len between the records' lengths (counted by the tokenizers library) drops the longer ones."""
    msft, _, _ = trained
    n, held_out = sorted(lengths(tiny, msft / "train.jsonl")), lengths(tiny, msft / "val.jsonl")
    max_len = max(n[len(n) // 2], min(held_out))  # (the held-out set must keep some: none is an error)
    longer = sum(x > max_len for x in n)
    assert 0 < longer < len(n)
    out = tmp_path / "run"
    proc = ok(train(tiny, demo_train, msft, out, "--max-steps", 1, "--save-every", 0, "--eval-every", 0,
                    "--max-len", max_len, "--no-pack"))  # packed, the count would be of rows, not records
    assert f"dropped {longer} of {len(n)}" in proc.stdout + proc.stderr
    held_out_longer = sum(x > max_len for x in held_out)
    if held_out_longer:
        assert f"dropped {held_out_longer} of {len(held_out)}" in proc.stdout + proc.stderr
    assert torch.load(out / "checkpoint.pt", weights_only=True)["meta"]["examples"] == len(n) - longer


def test_train_never_reuses_msft_data_built_from_another_source(tiny, demo_train, trained, tmp_path):
    """MSFT data cached from one --data (or built without --nc-from-model) is refused for another, naming the
    folder, not trained on; the default folder is another one per source, so it is built afresh there."""
    msft, _, _ = trained
    other = tmp_path / "bird"  # another dataset (the same files, so only the source differs)
    shutil.copytree(demo_train, other, symlinks=True)
    common = ("--max-steps", 1, "--save-every", 0, "--eval-every", 0, "--max-len", 100_000)
    refused = cli_all(("train.py", *train_args(tiny, other, msft, tmp_path / "a", *common)),
                      ("train.py", *train_args(tiny, demo_train, msft, tmp_path / "b", *common, "--nc-from-model")))
    for proc in refused:
        user_error(proc, str(msft), "built from", str(demo_train.resolve()))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

    import train as train_py  # the default folder, in-process, with a build that only records where it goes
    from route import msft as msft_module
    built = []

    def build(data, out, **kwargs):
        built.append(Path(out).name)
        raise InterruptedError

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_py, "ROOT", tmp_path)
        mp.setattr(msft_module, "build", build)
        for args in [(demo_train,), (other,), (demo_train, "--nc-from-model")]:
            with pytest.raises(InterruptedError):
                train_py.main(["--model", str(tiny), "--data", str(args[0]), *args[1:]])
    assert len(set(built)) == 3, built


def test_train_stops_on_unusable_settings(tiny, demo_train, trained, tmp_path):
    msft, run, _ = trained
    shortest = min(lengths(tiny, msft / "train.jsonl"))
    common = ("--max-steps", 3, "--save-every", 0, "--eval-every", 0)
    calls = [  # nothing short enough to train on
             ("train.py", *train_args(tiny, demo_train, msft, tmp_path / "b", *common, "--max-len", shortest - 1)),
             # every example fits one micro-batch, but a step wants two
             ("train.py", *train_args(tiny, demo_train, msft, tmp_path / "c", *common, "--max-len", 100_000,
                                      "--batch-tokens", 10_000_000, "--grad-accum", 2))]
    nothing, too_few = cli_all(*calls)
    assert nothing.returncode != 0 and "no usable examples" in nothing.stderr, nothing.stderr[-2000:]
    assert not (tmp_path / "b" / "adapter").exists()
    assert too_few.returncode != 0 and "grad_accum" in too_few.stderr, too_few.stderr[-2000:]
    # resuming with another batch budget would not continue the same run (and leaves it as it was)
    before = (run / "checkpoint.pt").read_bytes()
    proc = train(tiny, demo_train, msft, run, *common, "--max-len", 100_000, "--resume", "--batch-tokens", 3000)
    assert proc.returncode != 0 and "cannot resume" in proc.stderr and "batch_tokens" in proc.stderr
    assert (run / "checkpoint.pt").read_bytes() == before


# -- the real default model and the shipped adapter --------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("adapter", [None, ROOT / "adapters" / "qwen2.5-coder-0.5b-route"])
def test_infer_default_model_and_the_shipped_adapter(tmp_path, adapter, default_model):
    """`python infer.py` with no --model: the default model (no adapter unless asked for: it did not beat the
    untuned chain), and with the shipped adapter, answers a demo question right (plain text-to-SQL); the
    answer is checked by running gold SQL."""
    # default_model: fetched once into $ROUTE_HOME first (conftest), so infer.py finds it there
    db = DEMO / "database" / "poker_player" / "poker_player.sqlite"
    question = "What is the average earnings of poker players?"
    gold = "SELECT avg(Earnings) FROM poker_player"  # data/demo/dev.json
    want = [list(r) for r in sqlite3.connect(f"file:{db}?mode=ro", uri=True).execute(gold).fetchall()]
    # by hand: the five players' earnings 476090 + 189233 + 104871 + 596462 + 142800 = 1509456, / 5
    assert want == [[301891.2]]
    out = tmp_path / "t.jsonl"
    proc = ok(cli("infer.py", "--db", db, "--question", question, "--out", out,
                  *(["--adapter", adapter] if adapter else [])))
    assert ("qwen2.5-coder-0.5b-route" in proc.stdout) == bool(adapter)  # infer.py names the adapter it loaded
    rows, summary = traces(out)
    assert summary["steps"] == [] and rows[0]["error"] is None and rows[0]["rows"] == want, rows[0]
