"""Reliability guarantees (README "Guarantees"): bad input, path safety, faults, load, secrets.

Each test tries to break one promise. Bad input rows check the exit code, the message, that no
traceback is printed, and that nothing already on disk changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickletools
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phd_flow import keys
from phd_flow.errors import InvalidKeyError
from tests import s3_fixtures
from tests.conftest import cli, run_dirs, write_config

FAULT_NODES = '''
import dataclasses, os, time
from phd_flow import Node, logger, node


@dataclasses.dataclass
class SlowPickleArgs(node.Args):
    marker: str = ""


class SlowPickle:
    """A result whose pickling takes a while and announces itself."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __getstate__(self) -> dict:
        open(self.marker, "w").close()
        time.sleep(1.5)
        return {"marker": self.marker}


class PickleSlowly(Node[SlowPickleArgs, SlowPickle]):
    """Return a result that is slow to pickle."""

    def _run(self) -> SlowPickle:
        logger.info("about to return")
        return SlowPickle(self.args.marker)


@dataclasses.dataclass
class ManyArgs(node.Args):
    files: int = 10
    fail: bool = False


class ManyFiles(Node[ManyArgs, int]):
    """Write many small files."""

    def _run(self) -> int:
        out = self.output_dir / "parts"
        out.mkdir()
        for i in range(self.args.files):
            (out / f"part-{i:05d}.txt").write_text(f"{i}\\n")
        self.log_metric("files", self.args.files)
        if self.args.fail:
            raise RuntimeError("failed after writing")
        return self.args.files
'''


@pytest.fixture
def fproject(project: Path) -> Path:
    (project / "my_project" / "faults.py").write_text(FAULT_NODES)
    return project


def _tree(root: Path) -> dict[str, str]:
    """sha256 of every file below root (the 'nothing changed' snapshot); a run's lock files
    (``.phd_flow-*.lock``: never synced) left out."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and not _is_lock(p.name)
    }


def _is_lock(name: str) -> bool:
    return name.startswith(".phd_flow-") and name.endswith(".lock")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYTEST", "AWS_", "B2_"))}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    return env


def _shared_remote_config(remote: Path) -> str:
    return f'local_path = "${{PROJECT_ROOT}}/data_storage"\n[storage]\nbackend = "local"\nremote = "{remote}"\n'


# --- path safety -------------------------------------------------------------------------------


#: Path segments a key must never smuggle past keys.normalize (alone or inside a longer segment).
HOSTILE_SEGMENTS = [
    "..",
    ".",
    "",
    "/",
    "\\",
    "/etc",
    "/etc/passwd",
    "C:",
    "C:\\win",
    "c:x",
    "\x00",
    "\n",
    "\x1b",
    "\x7f",
]
#: Good segments: what run keys, stage names and file names look like (unicode included).
GOOD_SEGMENT = st.one_of(
    st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,15}", fullmatch=True),
    st.text(alphabet=st.characters(categories=["L", "N"]), min_size=1, max_size=8).filter(lambda t: t[1:2] != ":"),
    st.sampled_from(["run.json", "2024-01-01T00-00-00_ab12", "données", "résumé ✓.txt", "a..b", ".hidden", "x."]),
)
HOSTILE_SEGMENT = st.one_of(
    st.sampled_from(HOSTILE_SEGMENTS),
    st.characters(max_codepoint=31).map(lambda c: f"a{c}b"),  # control characters inside a name
    st.tuples(GOOD_SEGMENT, st.sampled_from(["..", "\\", "\x00"])).map(lambda t: t[0] + t[1]),
)


def _hostile(segment: str) -> bool:
    return segment in {"", ".", ".."} or "\\" in segment or any(ord(c) < 32 or ord(c) == 127 for c in segment)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(HOSTILE_SEGMENT, GOOD_SEGMENT), min_size=1, max_size=6))
def test_normalize_never_escapes_local_path(tmp_path: Path, parts: list[str]) -> None:
    """Property: a key built from hostile segments ('..', '.', '', '/', '\\', absolute, 'C:', NUL,
    control characters) mixed with good ones is refused with InvalidKeyError, or names a path below
    local_path made only of good segments."""
    raw = "/".join(parts)
    try:
        rel = keys.normalize(raw)
    except InvalidKeyError as exc:
        assert raw in str(exc) or repr(raw) in str(exc) or "empty" in str(exc), str(exc)
        return
    root = (tmp_path / "local").resolve()
    target = (root / rel).resolve()
    assert root in target.parents, (raw, rel)
    path = PurePosixPath(rel)
    assert not path.is_absolute() and rel.split("/") == list(path.parts), (raw, rel)
    assert not any(_hostile(part) for part in path.parts), (raw, rel)
    assert ":" not in rel[1:2], (raw, rel)


@settings(max_examples=300, deadline=None)
@given(st.lists(GOOD_SEGMENT, min_size=1, max_size=6), st.booleans())
def test_normalize_accepts_good_keys_unchanged(parts: list[str], trailing_slash: bool) -> None:
    """The other half of the property: refusing everything is not safety. Keys of good segments
    (run keys, nested files, unicode) are accepted as they are (a trailing '/' dropped)."""
    key = "/".join(parts)
    assert keys.normalize(key + ("/" if trailing_slash else "")) == key


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["..", "../x", "a/../../b", "/etc/passwd", "a\\..\\b", "x/\x00y", "C:\\win", "a/\nb"]))
def test_hostile_keys_are_refused(raw: str) -> None:
    with pytest.raises(InvalidKeyError):
        keys.normalize(raw)


# --- bad input: one table --------------------------------------------------------------------

BAD_CONFIG = [
    # (config text, argv, expected exit, expected message parts)
    ("local_path = \n", ["run", "FitOLS", "--dataset", "d", "--target", "t"], 2, ["default.toml", "line 1"]),
    (
        "local_path = '${PROJECT_ROOT}/d'\n[mlflow]\nexperimnt = 'x'\n",
        ["run", "FitOLS", "--dataset", "d", "--target", "t"],
        2,
        ["experimnt", "default.toml:3", "experiment"],
    ),
    ("local_path = 5\n", ["run", "FitOLS", "--dataset", "d", "--target", "t"], 2, ["local_path", "str"]),
    (
        "local_path = '${NO_SUCH_VAR_PHD}/d'\n",
        ["run", "FitOLS", "--dataset", "d", "--target", "t"],
        2,
        ["NO_SUCH_VAR_PHD"],
    ),
    (
        "local_path = '${PROJECT_ROOT}/d'\n[storage]\nbackend = 'gcs'\n",
        ["run", "FitOLS", "--dataset", "data/diabetes.csv", "--target", "target"],
        2,
        ["default.toml:3", "gcs", "Known"],
    ),
    (
        "local_path = '${PROJECT_ROOT}/d'\n[storage]\nbackend = 's3'\n",
        ["run", "FitOLS", "--dataset", "data/diabetes.csv", "--target", "target"],
        3,
        ["[storage] bucket"],
    ),
]

BAD_ARGS = [
    (["run", "FitOLZ"], 2, ["FitOLZ", "Did you mean 'FitOLS'"]),
    (["run", "FitOLS", "--dataset", "data/diabetes.csv"], 2, ["--target"]),
    (["run", "FitOLS", "--dataset", "data/diabetes.csv", "--target", "target", "--seed", "abc"], 2, ["--seed", "abc"]),
    (["run", "FitOLS", "--dataset", "d", "--target", "t", "--key", "../evil"], 2, ["'..'"]),
    (["run", "FitOLS", "--dataset", "d", "--target", "t", "--key", "{TMP}/evil"], 2, ["absolute"]),
    (["run", "FitOLS", "--dataset", "d", "--target", "t", "--load", "nostage"], 2, ["STAGE=KEY"]),
    (["download", "../../etc"], 2, ["'..'"]),
    (["download", "FitOLS_1999"], 2, ["FitOLS_1999"]),
    (["sync", "nosuchkey"], 2, ["nosuchkey"]),
    (["frobnicate"], 2, ["frobnicate"]),
]


def _assert_clean_user_error(proc: subprocess.CompletedProcess[str], code: int, parts: list[str]) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for part in parts:
        assert part in proc.stderr, (part, proc.stderr)


@pytest.mark.slow
@pytest.mark.parametrize(("text", "argv", "code", "parts"), BAD_CONFIG)
def test_bad_config_is_one_clear_message(
    project: Path, text: str, argv: list[str], code: int, parts: list[str]
) -> None:
    write_config(project, text)
    before = _tree(project)
    proc = cli(project, *argv)
    _assert_clean_user_error(proc, code, parts)
    after = _tree(project)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing already written changed


@pytest.fixture(scope="module")
def project_with_a_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example project after one completed run (made once for the bad-argument table)."""
    from tests.conftest import EXAMPLES

    root = tmp_path_factory.mktemp("with_run") / "proj"
    shutil.copytree(EXAMPLES / "my_project", root / "my_project", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(EXAMPLES / "data", root / "data")
    write_config(root, 'local_path = "${PROJECT_ROOT}/data_storage"\n[mlflow]\nexperiment = "test"\n')
    ok = cli(root, "run", "FitOLS", "--dataset", "data/diabetes.csv", "--target", "target")
    assert ok.returncode == 0, ok.stderr
    return root


@pytest.mark.slow
@pytest.mark.parametrize(("argv", "code", "parts"), BAD_ARGS)
def test_bad_arguments_are_one_clear_message(
    project_with_a_run: Path, tmp_path: Path, argv: list[str], code: int, parts: list[str]
) -> None:
    project = tmp_path / "proj"
    shutil.copytree(project_with_a_run, project)
    before = _tree(project)
    proc = cli(project, *[arg.replace("{TMP}", str(tmp_path)) for arg in argv])
    _assert_clean_user_error(proc, code, parts)
    assert _tree(project) == before
    assert not (project.parent / "evil").exists()  # project.parent is tmp_path: both keys' targets


def test_unwritable_local_path_fails_before_run(project: Path) -> None:
    (project / "blocker").write_text("a file, not a directory")
    write_config(project, 'local_path = "${PROJECT_ROOT}/blocker/sub"\n')
    proc = cli(project, "run", "FitOLS", "--dataset", "data/diabetes.csv", "--target", "target")
    _assert_clean_user_error(proc, 2, ["local_path", "default.toml:1", "writable"])
    assert "Got 442 samples" not in proc.stderr  # _run never started


@pytest.mark.slow
def test_corrupt_run_json_and_pickle_are_reported(project: Path) -> None:
    ok = cli(project, "run", "FitOLS", "--dataset", "data/diabetes.csv", "--target", "target")
    assert ok.returncode == 0, ok.stderr
    (run_dir,) = run_dirs(project / "data_storage")
    pickle_path = run_dir / "results.pickle"
    pickle_path.write_bytes(pickle_path.read_bytes()[:-7])  # truncated
    from phd_flow.config import load_config
    from phd_flow.errors import CorruptRunError
    from phd_flow.run.record import RunRecord
    from phd_flow.run.result import load_verified

    record = RunRecord.load(run_dir)
    with pytest.raises(CorruptRunError, match="sha256"):
        load_verified(load_config(project), run_dir, record.data["result"], record.key)
    (run_dir / "run.json").write_text('{"status": "compl')  # torn by hand
    before = _tree(project)
    proc = cli(project, "sync", run_dir.name)
    _assert_clean_user_error(proc, 2, ["run.json", run_dir.name])
    assert _tree(project) == before


# --- faults ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_while_pickling_the_result_keeps_the_result(fproject: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pickling"
    proc = subprocess.Popen(
        [sys.executable, "-m", "my_project", "run", "PickleSlowly", "--marker", str(marker)],
        cwd=fproject,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    (run_dir,) = run_dirs(fproject / "data_storage")
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "killed"
    # The result being saved when the signal came was saved whole and verifies.
    data = (run_dir / "results.pickle").read_bytes()
    assert hashlib.sha256(data).hexdigest() == record["result"]["sha256"]
    ops = list(pickletools.genops(data))  # a whole pickle: every opcode parses, STOP ends the bytes
    assert ops[-1][0].name == "STOP" and ops[-1][2] == len(data) - 1
    assert str(marker).encode() in data  # the complete state is there
    assert "about to return" in (run_dir / "output.log").read_text()


@pytest.mark.slow
def test_failed_run_is_synced_whole_to_the_remote(fproject: Path, tmp_path: Path) -> None:
    remote = tmp_path / "shared"
    write_config(fproject, _shared_remote_config(remote))
    proc = cli(fproject, "run", "ManyFiles", "--files", "50", "--fail", "true")
    assert proc.returncode == 1, proc.stderr
    (run_dir,) = run_dirs(fproject / "data_storage")
    mirrored = remote / run_dir.name
    assert _tree(mirrored) == _tree(run_dir)
    assert json.loads((mirrored / "run.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_two_machines_sync_to_one_prefix_at_once(fproject: Path, tmp_path: Path) -> None:
    """Two local_paths pushing their runs (different keys) to one remote at the same moment
    overwrite nothing (one shared path: test_two_machines_write_one_shared_path_at_once)."""
    remote = tmp_path / "shared"
    second = tmp_path / "second"
    shutil.copytree(fproject, second, ignore=shutil.ignore_patterns("data_storage"))
    for proj in (fproject, second):
        write_config(proj, _shared_remote_config(remote))
    results: list[subprocess.CompletedProcess[str]] = []
    threads = [
        threading.Thread(target=lambda p=p: results.append(cli(p, "run", "ManyFiles", "--files", "200")))
        for p in (fproject, second)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-1500:] for r in results]
    local_runs = run_dirs(fproject / "data_storage") + run_dirs(second / "data_storage")
    assert len({d.name for d in local_runs}) == 2
    for run_dir in local_runs:
        assert _tree(remote / run_dir.name) == _tree(run_dir)


_PUSH_SHARED = """
import sys
from pathlib import Path
from phd_flow.log import logger
from phd_flow.storage.engine import MANIFEST
from phd_flow.storage.local import LocalRemote
from phd_flow.testing import storage_for, write_tree
from phd_flow.testing.contract import until
name, remote, local, signals, mode = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5]
gate = signals / "gate"  # omega wrote its manifest, or waits for its turn

class Machine(LocalRemote):
    def write_bytes(self, key, data):
        if key.endswith(MANIFEST) and name == "alpha" and mode == "held":
            (signals / "alpha-held").touch()  # every file uploaded, the manifest not yet written
            until(gate.exists, "omega to write its manifest or wait for its turn")
        super().write_bytes(key, data)
        if key.endswith(MANIFEST) and name == "omega":
            gate.touch()

logger.add(lambda message: gate.touch() if "waiting for it to finish" in message else None, level="INFO")
storage = storage_for(Machine(remote), local, workers=4)
files = {f"f{i:03d}.txt": f"{name} wrote file {i}\\n".encode() * (1 + i % 7) for i in range(150)}
write_tree(storage.path("shared/datasets"), {**files, "big.bin": name.encode() * (3 << 20)})
(signals / f"{name}-ready").touch()
until((signals / "go").exists, "the test to say go")
print(storage.upload("shared/datasets"))
"""


def _push_to_one_path(tmp_path: Path, mode: str) -> Path:
    """Two machines (processes) push different contents (same names and sizes) to the same
    remote path. ``race``: both start at one signal. ``held``: alpha uploads every file and is
    held before its manifest until omega has written its own or waits for its turn (the
    interleaving that mixed versions before pushes took turns)."""
    from phd_flow.testing.contract import until

    remote, signals = tmp_path / "shared", tmp_path / "signals"
    remote.mkdir()
    signals.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def start(name: str) -> subprocess.Popen[str]:
        argv = [sys.executable, "-c", _PUSH_SHARED, name, str(remote), str(tmp_path / name), str(signals), mode]
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    if mode == "race":
        procs = [start("alpha"), start("omega")]
        until(
            lambda: all((signals / f"{n}-ready").exists() for n in ("alpha", "omega")), "both machines to be ready", 120
        )
        (signals / "go").touch()
    else:
        (signals / "go").touch()
        procs = [start("alpha")]
        until(lambda: (signals / "alpha-held").exists() or procs[0].poll() is not None, "alpha's uploads", 120)
        procs.append(start("omega"))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    return remote / "shared" / "datasets"


def _versions(tmp_path: Path) -> dict[str, dict[str, bytes]]:
    from phd_flow.testing.contract import read_tree

    return {name: read_tree(tmp_path / name / "shared" / "datasets") for name in ("alpha", "omega")}


def test_two_machines_write_one_shared_path_at_once(tmp_path: Path) -> None:
    """Two machines push different contents to the SAME remote path at the same moment: a third
    machine's download (verified against the remote manifest) is one machine's whole version."""
    from phd_flow.storage.local import LocalRemote
    from phd_flow.testing.contract import read_tree, storage_for

    pushed = _push_to_one_path(tmp_path, "race")
    third = storage_for(LocalRemote(pushed.parents[1]), tmp_path / "third")
    third.download("shared/datasets")
    assert read_tree(third.path("shared/datasets")) in _versions(tmp_path).values()


def test_two_machines_one_shared_path_leave_one_whole_version(tmp_path: Path) -> None:
    """The interleaving that used to mix versions (alpha's manifest written over omega's files):
    pushes to one path take turns, so the remote holds omega's whole version (the later turn)
    and a manifest that vouches for exactly its bytes; no marker is left behind."""
    from phd_flow.storage.engine import MANIFEST, parse_manifest
    from phd_flow.testing.contract import read_tree

    pushed = _push_to_one_path(tmp_path, "held")
    manifest = parse_manifest((pushed / MANIFEST).read_bytes())
    tree = {p.relative_to(pushed).as_posix(): p.read_bytes() for p in pushed.rglob("*") if p.is_file()}
    assert tree.pop(MANIFEST)
    assert set(manifest) == set(tree), "no file without its manifest entry, no marker left behind"
    mismatched = [rel for rel, entry in manifest.items() if hashlib.sha256(tree[rel]).hexdigest() != entry.sha256]
    assert not mismatched, f"the remote manifest does not match the bytes of {len(mismatched)} files: {mismatched[:5]}"
    assert read_tree(pushed) == _versions(tmp_path)["omega"], "the remote holds a mix of both machines' versions"


# --- secrets -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_secrets_never_written_anywhere(fproject: Path) -> None:
    """Keys in the environment and in the config file: no byte phd_flow writes contains them.

    The B2 account is unreachable here (no internet), so the sync path with its error messages
    runs too; the run ends "not synced" (exit 3).
    """
    secrets = {
        "AWS_SECRET_ACCESS_KEY": "awsSecretZ8q1",
        "AWS_ACCESS_KEY_ID": "AKIAPHDFLOWTEST77",
        "AWS_SESSION_TOKEN": "sessTokenQ4w2",
    }
    file_secrets = ["b2KeyIdQ9z3", "b2AppKeyW7x5"]
    config = write_config(
        fproject,
        'local_path = "${PROJECT_ROOT}/data_storage"\n'
        f'b2_key_id = "{file_secrets[0]}"\nb2_key = "{file_secrets[1]}"\nb2_bucket = "bkt"\n'
        '[mlflow]\nexperiment = "test"\n',
    )
    config.chmod(0o644)
    outputs = []
    for argv, code in ((["ManyFiles", "--files", "3"], 3), (["ManyFiles", "--fail", "true"], 1)):
        proc = cli(fproject, "run", *argv, env=secrets)
        assert proc.returncode == code, proc.stderr[-3000:]
        outputs.append(proc.stdout + proc.stderr)
    assert "readable by other users" in outputs[0] and "chmod 600" in outputs[0]
    needles = [s.encode() for s in [*secrets.values(), *file_secrets]]
    written = [p for p in fproject.rglob("*") if p.is_file() and p != config]
    assert any(p.name == "mlflow.db" for p in written)
    hits = [(str(p), n) for p in written for n in needles if n in p.read_bytes()]
    hits += [("stdout/stderr", n) for out in outputs for n in needles if n.decode() in out]
    assert not hits
    for run_dir in run_dirs(fproject / "data_storage"):
        snapshot = json.loads((run_dir / "reproducible.json").read_text())
        assert "environment" not in snapshot and "env" not in snapshot
        assert json.loads((run_dir / "run.json").read_text())["sync"]["state"] == "not_synced"


# --- storage input and faults --------------------------------------------------------------------

moto_server = s3_fixtures.moto_server  # the session's S3 server (moto, 127.0.0.1)


def test_bucket_that_does_not_exist_is_named(project: Path, moto_server: s3_fixtures.S3Server) -> None:
    write_config(
        project,
        'local_path = "${PROJECT_ROOT}/data_storage"\n[mlflow]\nenabled = false\n'
        f'[storage]\nbackend = "s3"\nbucket = "no-such-bucket-phd"\nendpoint_url = "{moto_server.endpoint_url}"\n',
    )
    proc = cli(project, "run", "FitOLS", "--dataset", "data/diabetes.csv", "--target", "target", env=moto_server.env())
    assert proc.returncode == 3, proc.stderr
    assert "no-such-bucket-phd" in proc.stderr and "[storage] bucket" in proc.stderr
    assert "Traceback" not in proc.stderr
    (run_dir,) = run_dirs(project / "data_storage")
    assert json.loads((run_dir / "run.json").read_text())["sync"]["state"] == "not_synced"
    assert (run_dir / "results.pickle").exists()


@pytest.mark.slow
def test_sigterm_during_the_final_sync_completes_the_sync(fproject: Path, tmp_path: Path) -> None:
    remote = tmp_path / "shared"
    write_config(
        fproject,
        f'local_path = "${{PROJECT_ROOT}}/data_storage"\n[mlflow]\nenabled = false\n'
        f'[storage]\nbackend = "local"\nremote = "{remote}"\nworkers = 1\n',
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "my_project", "run", "ManyFiles", "--files", "3000"],
        cwd=fproject,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not any(remote.glob("ManyFiles_*/parts/part-*")):  # the final sync has started
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    (run_dir,) = run_dirs(fproject / "data_storage")
    record = json.loads((run_dir / "run.json").read_text())
    assert proc.returncode == 143, stderr[-2000:]
    assert record["status"] == "completed" and record["sync"]["state"] == "synced"  # it had completed
    assert _tree(remote / run_dir.name) == _tree(run_dir)
