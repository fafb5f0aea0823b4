"""The command-line tools given bad input: one line on stderr that names the culprit, exit status 1 (130 for
Ctrl-C), never a traceback. Each case runs infer.py, train.py or `python -m route.hub` in a subprocess, with a
tiny random-weight model (tests/tiny.py) and a temporary $ROUTE_HOME: nothing is downloaded.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DEMO, demo_db

ROOT = Path(__file__).resolve().parents[1]


def run(args, tmp_path, timeout=120, **env):
    # PIP_CONFIG_FILE=/dev/null: pip reads no configuration (no extra index could serve the default model)
    env = {**os.environ, "ROUTE_HOME": str(tmp_path / "home"), "PIP_CONFIG_FILE": os.devnull, "OMP_NUM_THREADS": "1",
           **env}
    env.pop("ROUTE_DEBUG", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def assert_one_line(done, *culprits, code=1, alone=True):
    """Exit status `code`, no traceback, and one `error:` line, the last on stderr, naming every culprit.
    `alone`: nothing else on stderr (a fetch prints its progress there first)."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert lines and lines[-1].startswith("error: "), done.stderr
    assert sum(line.startswith("error") for line in lines) == 1, done.stderr
    if alone:
        assert len(lines) == 1, done.stderr
    for culprit in culprits:
        assert str(culprit) in lines[-1], (culprit, lines[-1])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny HF-format model directory, and a valid LoRA adapter for it."""
    import torch

    from route.lora import add_lora, save_adapter
    from route.weights import load_model
    from tiny import write_tiny, write_tiny_tokenizer

    d = tmp_path_factory.mktemp("tiny")
    write_tiny(d / "model")
    write_tiny_tokenizer(d / "model")
    model = load_model(d / "model", dtype=torch.float32)
    add_lora(model, 4, 8, 0.0, ("q_proj", "v_proj"))
    save_adapter(model, d / "adapter")
    return d / "model", d / "adapter"


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "concert_singer.sqlite"
    shutil.copy(demo_db("concert_singer"), path)
    return path


def infer(tmp_path, db, *args, **env):
    return run(["infer.py", "--db", str(db), "--question", "How many singers?", "--dtype", "fp32", "--quiet",
                *args], tmp_path, **env)


def test_corrupted_or_truncated_adapter(tiny, db, tmp_path):
    model, adapter = tiny
    for name, damage in [("truncated", lambda b: b[:len(b) // 2]), ("junk", lambda b: b"\xff" * 64)]:
        bad = tmp_path / name
        shutil.copytree(adapter, bad)
        weights = bad / "adapter_model.safetensors"
        weights.write_bytes(damage(weights.read_bytes()))
        assert_one_line(infer(tmp_path, db, "--model", str(model), "--adapter", str(bad)), weights,
                        "not a readable safetensors file")


def test_config_files_that_are_not_json(tiny, db, tmp_path):
    model, adapter = tiny
    bad_adapter = tmp_path / "adapter"
    shutil.copytree(adapter, bad_adapter)
    (bad_adapter / "adapter_config.json").write_text("{not json")
    assert_one_line(infer(tmp_path, db, "--model", str(model), "--adapter", str(bad_adapter)),
                    bad_adapter / "adapter_config.json", "not a valid JSON file")
    bad_model = tmp_path / "model"
    shutil.copytree(model, bad_model)
    (bad_model / "config.json").write_bytes(b"\xff\xfe garbage")
    assert_one_line(infer(tmp_path, db, "--model", str(bad_model)), bad_model / "config.json")
    bad_tok = tmp_path / "model_tok"
    shutil.copytree(model, bad_tok)
    (bad_tok / "tokenizer.json").write_text("{truncated")
    assert_one_line(infer(tmp_path, db, "--model", str(bad_tok)), bad_tok / "tokenizer.json")


def test_missing_model(db, tmp_path):
    assert_one_line(infer(tmp_path, db, "--model", str(tmp_path / "nowhere")), tmp_path / "nowhere")


def test_over_long_question_is_refused(db, tmp_path):
    done = run(["infer.py", "--db", str(db), "--question", "how many " * 2500], tmp_path)
    assert_one_line(done, "22500 characters", "at most 2000")


def test_dataset_file_that_is_not_utf8(tmp_path):
    data = tmp_path / "data"
    (data / "database").mkdir(parents=True)
    (data / "dev.json").write_bytes(json.dumps([{"question": "caf\u00e9?", "db_id": "x", "query": "SELECT 1"}])
                                    .encode("latin-1").replace(b"\\u00e9", b"\xe9"))
    assert_one_line(run(["infer.py", "--data", str(data), "--split", "dev"], tmp_path), data / "dev.json", "UTF-8")


def test_unwritable_route_home(db, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("ROUTE_HOME cannot be made below a file (permissions would not stop root)")
    home = blocker / "home"
    done = run(["infer.py", "--db", str(db), "--question", "How many singers?"], tmp_path, ROUTE_HOME=str(home))
    assert_one_line(done, f"ROUTE_HOME={home}", "writable")


def test_failed_default_model_fetch(tmp_path):
    (tmp_path / "empty").mkdir()
    done = run(["-m", "route.hub"], tmp_path, ROUTE_WHEELS=str(tmp_path / "empty"))
    assert_one_line(done, "pip could not download", "ROUTE_WHEELS", "No matching distribution", alone=False)
    assert "Collecting" not in done.stderr  # pip's own output is kept for the message, not printed
    assert not list((tmp_path / "home" / "models").glob(".fetch-*"))


def test_train_bad_data_and_model(tiny, tmp_path):
    msft = tmp_path / "msft"  # not built: train.py would build it from --data first
    assert_one_line(run(["train.py", "--data", str(tmp_path / "nowhere"), "--msft", str(msft)], tmp_path),
                    tmp_path / "nowhere")
    assert_one_line(run(["train.py", "--data", str(DEMO), "--model", str(tmp_path / "nomodel"), "--msft", str(msft)],
                        tmp_path), tmp_path / "nomodel")
    assert not msft.exists()  # both refused before any data was built


def test_ctrl_c_exits_130_without_traceback(db, tmp_path):
    """SIGINT while infer.py loads its model: `interrupted`, status 130, no traceback."""
    code = ("import runpy, sys, time\n"
            "import route.hub\n"
            "def slow(arg):\n"
            "    print('loading', flush=True)\n"
            "    time.sleep(60)\n"
            "route.hub.resolve_model = slow\n"
            f"sys.argv = ['infer.py', '--db', {str(db)!r}, '--question', 'How many singers?']\n"
            "runpy.run_path('infer.py', run_name='__main__')\n")
    env = {**os.environ, "ROUTE_HOME": str(tmp_path / "home")}
    with subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as child:
        assert child.stdout.readline().strip() == "loading"
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
    assert child.returncode == 130 and err.strip() == "interrupted", err


@pytest.mark.parametrize("args, culprit", [
    (["--steps", "sl,xx"], "unknown MCP steps ['xx']"), (["--samples", "-1"], "--samples"),
    (["--temperature", "0"], "--temperature"), (["--fast", "--mcp"], "--fast")])
def test_infer_checks_every_option_before_loading_a_model(tmp_path, args, culprit):
    # the model does not exist: had it been resolved first, its error would come instead
    assert_one_line(run(["infer.py", "--model", str(tmp_path / "no-model"), *args], tmp_path), culprit)


def test_every_entry_point_ends_in_one_line(tmp_path):
    assert_one_line(run(["-m", "route.export", "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                        tmp_path), "adapter_config.json")
    assert_one_line(run(["-m", "route.msft", "--data", str(tmp_path / "no-spider"), "--out", str(tmp_path / "o")],
                        tmp_path), "no-spider")


def test_resume_without_a_checkpoint_is_an_error_naming_the_folder(tmp_path):
    done = run(["train.py", "--resume", "--out", str(tmp_path / "run")], tmp_path)
    assert_one_line(done, tmp_path / "run", "--resume")


def test_resume_without_a_checkpoint_in_the_library_keeps_the_metrics(tmp_path):
    from route.checkpoint import start_step
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        start_step(tmp_path, None, None, {}, resume=True, rank=0)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'  # it used to be deleted
