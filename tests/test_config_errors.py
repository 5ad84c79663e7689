"""Bad configuration is refused at start-up with one line naming the bad value and exit code 2, never a
traceback: malformed YAML/JSON, impossible sizes, unknown transports, malformed addresses, in `kvrelay store`,
`engine`, `up`, `router`."""

import json
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

MORE_THAN_MEMORY = "1024TiB"


def run(*args: str) -> tuple[int, list[str]]:
    proc = subprocess.run([sys.executable, "-m", "kvrelay.cli", *args], capture_output=True, text=True, timeout=240)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("kvrelay up: logs in")]
    return proc.returncode, lines


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cfg")
    (d / "malformed.yaml").write_text("pool_size: [1,\n")
    (d / "wrong_type.yaml").write_text("port: abc\n")
    (d / "ckpt").mkdir()
    (d / "ckpt" / "config.json").write_text('{"vocab_size": 10,')
    (d / "ckpt_partial").mkdir()
    (d / "ckpt_partial" / "config.json").write_text(json.dumps({"vocab_size": 10}))
    return d


STORE = ["store", "--port", "0", "--metrics-port", "-1", "--log-level", "WARNING"]
ENGINE = ["engine", "--port", "0", "--log-level", "WARNING"]
ROUTER = ["router", "--decode", "http://127.0.0.1:1"]
CASES = {
    "store malformed yaml": ([*STORE, "--config", "{d}/malformed.yaml"], ["malformed.yaml", "malformed YAML", "line 2"]),
    "store missing yaml": ([*STORE, "--config", "{d}/missing.yaml"], ["missing.yaml", "cannot read"]),
    "store yaml wrong type": ([*STORE, "--config", "{d}/wrong_type.yaml"], ["port", "'abc'"]),
    "store zero pool": ([*STORE, "--pool-size", "0"], ["pool_size 0"]),
    "store negative pool": ([*STORE, "--pool-size=-1GiB"], ["pool_size", "'-1GiB'"]),
    "store pool over memory": ([*STORE, "--pool-size", MORE_THAN_MEMORY], ["pool_size", "memory"]),
    "store unknown transport": ([*STORE, "--transports", "shm,carrier-pigeon"], ["carrier-pigeon"]),
    "engine malformed config.json": ([*ENGINE, "--checkpoint", "{d}/ckpt"], ["config.json", "malformed JSON"]),
    "engine config.json missing key": ([*ENGINE, "--checkpoint", "{d}/ckpt_partial"], ["ckpt_partial", "missing key"]),
    "engine chunk size 0": ([*ENGINE, "--chunk-tokens", "0"], ["chunk_tokens", "0"]),
    "engine unknown transport": ([*ENGINE, "--role", "decode", "--store", "tcp://127.0.0.1:9", "--transport", "udp"],
                                 ["'udp'"]),
    "up unknown transport": (["up", "--transport", "udp"], ["'udp'"]),
    "up zero pool": (["up", "--pool-size", "0"], ["pool_size 0"]),
    "up pool over memory": (["up", "--pool-size", MORE_THAN_MEMORY], ["memory"]),
    "up block size 0": (["up", "--decode-block-size", "0"], ["--decode-block-size 0"]),
    "router port out of range": ([*ROUTER, "--port", "99999"], ["--port 99999"]),
    "router decode not a url": (["router", "--decode", "notaurl"], ["--decode 'notaurl'", "http://HOST:PORT"]),
    "router store without port": ([*ROUTER, "--store", "tcp://127.0.0.1"], ["--store 'tcp://127.0.0.1'", "no port"]),
    "router backoff nan": ([*ROUTER, "--retry-backoff", "nan"], ["--retry-backoff nan"]),
}


@pytest.fixture(scope="module")
def results(files):
    """Every case's (exit code, stderr lines), run four at a time (most of each is Python and torch imports)."""
    with ThreadPoolExecutor(4) as ex:
        runs = {case: ex.submit(run, *[a.format(d=files) for a in args]) for case, (args, _) in CASES.items()}
        return {case: future.result() for case, future in runs.items()}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(CASES))
def test_bad_configuration_is_one_line_and_exit_2(results, case):
    code, lines = results[case]
    expected = CASES[case][1]
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert all(e in lines[0] for e in expected), lines


@pytest.mark.slow  # `kvrelay up` starts a store and engines
@pytest.mark.timeout(300)
def test_up_passes_on_an_engines_configuration_error(files, tmp_path):
    """A child that refuses its configuration (exit 2, one line) makes `kvrelay up` exit 2 with that line."""
    code, lines = run("up", "--pool-size", "16MiB", "--checkpoint", str(files / "ckpt"), "--workdir", str(tmp_path))
    assert code == 2 and len(lines) == 1 and "malformed JSON" in lines[0], lines


@pytest.mark.timeout(120)
def test_router_on_a_port_in_use_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # ERROR: the start-up probe's warning about the dead decode worker is not the error line
        code, lines = run(*ROUTER, "--port", str(port), "--log-level", "ERROR")
    assert code == 2 and len(lines) == 1, lines
    assert f"--port {port}" in lines[0] and "in use" in lines[0], lines
