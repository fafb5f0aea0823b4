"""Small file helpers shared by the writers and readers of models, adapters, data and checkpoints.

Every file or directory this project writes appears whole or not at all: it is built under a temporary name
beside its destination and renamed into place (atomic on POSIX); an error or a Ctrl-C removes the temporary.
"""
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def read_json_file(file: Path):
    """A JSON file's content; one that is not UTF-8 JSON is a ValueError that names it."""
    try:
        return json.loads(Path(file).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not a valid JSON file ({e})") from None


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_file(path: str | Path):
    """`with atomic_file(path) as tmp:` write `tmp`; when the block succeeds it replaces `path` in one rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | Path, replace: bool = True):
    """`with atomic_dir(path) as tmp:` fill the new directory `tmp` (beside `path`, named `.NAME.tmp-*`, which
    route.hub sweeps up after a SIGKILL); when the block succeeds it takes `path`'s place. replace=False: a
    non-empty `path` is a FileExistsError and stays untouched (the rename fails rather than overwrite)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        for f in tmp.iterdir():  # mkdtemp and safetensors create private files; a model directory is not secret
            f.chmod(0o644)
        tmp.chmod(0o755)
        if replace and path.exists():  # the old one goes aside first: a crash leaves one or the other whole
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, path)
            except OSError:  # someone filled `path` meanwhile: theirs stays untouched
                raise FileExistsError(f"{path} already exists and is not empty") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
