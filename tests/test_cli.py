"""`kvrt` command line: flag parsing and errors, `model init-tiny`, `serve` as a real process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from kvrt.runtime.cli import build_parser, main, serve_config
from kvrt.runtime.config import (
    ConfigError,
    ControlConfig,
    EngineConfig,
    ServeConfig,
    ServerLimits,
    format_size,
    parse_size,
)

READY = re.compile(r"^kvrt ready: serving (\S+) at (http://127\.0\.0\.1:(\d+))$")


def test_serve_defaults_come_from_the_configs() -> None:
    config = serve_config(build_parser().parse_args(["serve"]))
    assert config == ServeConfig()
    assert config.engine == EngineConfig()


def test_help_writes_sizes_as_the_readme_does(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for flag, size in (("--kv-cache-memory", "512MiB"), ("--max-body-size", "64MiB"),
                       ("--max-body-rate-per-tenant", "32MiB a second"),
                       ("--max-graph-bytes-per-tenant", "16MiB")):
        assert f"(default: {size})" in text.split(f"{flag} SIZE", 2)[-1][:400], flag
    assert "bytes)" not in text and "536870912" not in text
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 256MiB)" in text and "(default: 1GiB)" in text


@pytest.mark.parametrize(("size", "text"), [(512 * 1024**2, "512MiB"), (2 * 1024**3, "2GiB"),
                                            (1536, "1536"), (3 * 1024, "3KiB"), (0, "0"),
                                            (5 * 1024**4, "5TiB")])
def test_a_size_is_written_in_its_largest_exact_unit_and_reads_back(size, text) -> None:
    assert format_size(size) == text and parse_size(text) == size


def test_serve_flags_reach_the_config() -> None:
    args = build_parser().parse_args([
        "serve", "--model", "/m", "--host", "0.0.0.0", "--port", "0", "--device", "cpu",
        "--dtype", "bfloat16", "--kv-cache-memory", "2GiB", "--host-cache-memory", "8GiB",
        "--max-model-len", "4096",
        "--max-num-seqs", "8", "--max-num-batched-tokens", "1024", "--block-size", "32",
        "--policy", "tokencake", "--policy-option", "offload_margin=3",
        "--policy-option", " write_through = false ", "--kernels", "torch",
        "--served-model-name", "m",
        "--log-level", "debug", "--no-prefix-caching", "--seed", "3",
        "--seconds-per-output-token", "0.05", "--max-live-runs", "10",
        "--transition-prior-observations", "5", "--min-branch-share", "0.1",
        "--tool-call-parser", "hermes", "--api-key", "sk-alpha-123:acme",
        "--api-key", "sk-beta-4567", "--metrics-public", "--state-dir", "/var/kvrt",
        "--max-queued-requests", "7", "--max-queued-tokens", "9000", "--request-timeout", "5",
        "--max-body-size", "1MiB", "--max-messages", "12", "--max-events-per-second", "3",
        "--shutdown-timeout", "2", "--admin-key", "sk-operator-1", "--header-timeout", "4",
    ])
    assert serve_config(args) == ServeConfig(
        host="0.0.0.0", port=0, log_level="debug", served_model_name="m",
        tool_call_parser="hermes",
        api_keys=(("sk-alpha-123", "acme"), ("sk-beta-4567", "default")), metrics_public=True,
        admin_keys=("sk-operator-1",), state_dir="/var/kvrt",
        limits=ServerLimits(max_queued_requests=7, max_queued_tokens=9000, request_timeout_s=5,
                            max_body_bytes=1024**2, max_messages=12, max_events_per_s=3,
                            shutdown_timeout_s=2, header_timeout_s=4),
        engine=EngineConfig(model="/m", device="cpu", dtype="bfloat16",
                            kv_cache_memory=2 * 1024**3, host_cache_memory=8 * 1024**3,
                            block_size=32, max_model_len=4096,
                            max_num_seqs=8, max_num_batched_tokens=1024, prefix_caching=False,
                            policy="tokencake",
                            policy_options={"offload_margin": "3", "write_through": "false"},
                            kernels="torch", seed=3),
        control=ControlConfig(seconds_per_output_token=0.05, max_live_runs=10,
                              transition_prior_observations=5, min_branch_share=0.1),
    )


def test_the_graph_bytes_quota_takes_a_size_and_must_be_positive() -> None:
    args = build_parser().parse_args(["serve", "--max-graph-bytes-per-tenant", "2MiB"])
    assert serve_config(args).control.max_graph_bytes_per_tenant == 2 * 1024**2
    args = build_parser().parse_args(["serve", "--max-graph-bytes-per-tenant", "0"])
    with pytest.raises(ConfigError, match="max_graph_bytes_per_tenant must be positive"):
        serve_config(args)


@pytest.mark.parametrize(("argv", "words"), [
    (["serve", "--device", "tpu"], "--device"),
    (["serve", "--policy", "fifo"], "--policy"),
    (["serve", "--tool-call-parser", "mistral"], "--tool-call-parser"),
    (["serve", "--api-key", "short"], "at least 8 characters"),
    (["serve", "--api-key", "long-enough-key:bad tenant"], "bad tenant name"),
    (["serve", "--api-key", "sk-same-key-1", "--api-key", "sk-same-key-1:b"], "given twice"),
    (["serve", "--api-key", ":acme"], "no key before the ':'"),
    (["serve", "--api-key", "long-enough-key:"], "no tenant after the ':'"),
    (["serve", "--api-key", "long-enough-k\u00e9y"], "printable ASCII"),
    (["serve", "--admin-key", "short"], "at least 8 characters"),
    (["serve", "--api-key", "sk-same-key-1:a", "--admin-key", "sk-same-key-1"],
     "also an API key of tenant 'a'"),
    (["serve", "--admin-key", "sk-operator-1", "--admin-key", "sk-operator-1"],
     "admin key is given twice"),
    (["serve", "--header-timeout", "0"], "header_timeout_s must be positive"),
    (["serve", "--api-keys-file", "/nonexistent/keys"], "cannot read the API keys file"),
    (["serve", "--max-queued-requests", "0"], "max_queued_requests must be positive"),
    (["serve", "--min-branch-share", "2"], "min_branch_share must be in [0, 1]"),
    (["serve", "--transition-prior-observations", "0"],
     "transition_prior_observations must be positive"),
    (["serve", "--request-timeout", "-1"], "request_timeout_s cannot be negative"),
    (["serve", "--kv-cache-memory", "lots"], "not a size"),
    (["serve", "--host-cache-memory", "lots"], "not a size"),
    (["serve", "--port", "http"], "--port"),
    (["serve", "--port", "70000"], "port must be in 0..65535"),
    (["serve", "--max-num-seqs", "0"], "max_num_seqs must be positive"),
    (["serve", "--max-model-len", "-1"], "max_model_len must be positive"),
    (["serve", "--max-live-runs", "0"], "max_live_runs must be positive"),
    (["serve", "--bogus"], "unrecognized arguments"),
    (["serve", "--policy-option", "offload_margin"], "expected KEY=VALUE"),
    (["serve", "--policy-option", "offload_margin=2"], "this policy takes: none"),
    (["serve", "--policy", "tokencake", "--policy-option", "diff_keep=0.5"],
     "unknown policy option diff_keep"),
    (["serve", "--policy", "kvrt", "--policy-option", "mode=off"], "unknown policy option mode"),
    (["serve", "--policy", "ttl", "--policy-option", "margin=soon"], "takes a float"),
    (["serve", "--policy", "tokencake", "--policy-option", "offload_margin=0.5"],
     "bad policy option"),
    (["model", "init-tiny"], "DIR"),
    (["model", "init-tiny", "d", "--arch", "gpt2"], "--arch"),
    ([], "COMMAND"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_flags_exit_2_with_one_line(argv, words, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kvrt") and "error:" in err, err
    assert words in err


def test_an_unusable_state_dir_stops_serve_before_the_model_loads(tmp_path: Path,
                                                                 capsys) -> None:
    taken = tmp_path / "a-file"
    taken.write_text("not a directory")
    with pytest.raises(SystemExit) as exited:  # the model does not exist: had it been looked
        main(["serve", "--state-dir", str(taken), "--model", str(tmp_path / "no-model")])
    assert exited.value.code == 2  # for first, the error would name it, not the state dir
    err = capsys.readouterr().err
    assert "state dir" in err and err.count("\n") == 1, err


def test_init_tiny_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    from kvrt.runtime.model.checkpoint import load_checkpoint

    assert main(["model", "init-tiny", str(tmp_path / "q3"), "--arch", "qwen3", "--seed", "1"]) == 0
    checkpoint = load_checkpoint(str(tmp_path / "q3"))
    assert checkpoint.config.arch == "qwen3"
    assert checkpoint.tokenizer.encode_chat([{"role": "user", "content": "hi"}])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kvrt.runtime.model.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("cli") / "tiny")


def kvrt_serve(*flags: str) -> subprocess.Popen:
    # The installed `kvrt` script is this same entry point; `-m` needs no PATH lookup.
    return subprocess.Popen(
        [sys.executable, "-m", "kvrt.runtime.cli", "serve", "--port", "0", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONSAFEPATH": "1"},
    )


def read_ready_line(proc: subprocess.Popen, timeout: float = 60) -> re.Match:
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not result or not result[0]:
        proc.kill()
        raise AssertionError(f"no ready line; stderr:\n{proc.communicate()[1]}")
    match = READY.match(result[0].rstrip("\n"))
    assert match, result[0]
    return match


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_prints_ready_line_answers_and_exits_cleanly(tiny_dir: Path, sig) -> None:
    proc = kvrt_serve("--model", str(tiny_dir), "--served-model-name", "tiny-cli",
                      "--kv-cache-memory", "4MiB", "--max-model-len", "256")
    try:
        model, url, _ = read_ready_line(proc).groups()
        assert model == "tiny-cli"
        with urllib.request.urlopen(url + "/health", timeout=10) as resp:
            assert resp.status == 200
        with urllib.request.urlopen(url + "/v1/models", timeout=10) as resp:
            assert json.load(resp)["data"][0]["id"] == "tiny-cli"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    # The ready line and the live view's address are all there is on stdout (read_ready_line
    # read the first; whether the second is still unread depends on the pipe's buffering).
    assert out in ("", f"kvrt live view: {url}/ui\n")
    assert "Traceback" not in err


def test_serve_missing_model_fails_with_one_line(tmp_path: Path) -> None:
    proc = kvrt_serve("--model", str(tmp_path / "nothing-here"))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert out == "" and "Traceback" not in err
    assert "nothing-here" in err and len(err.strip().splitlines()) <= 2, err


def test_an_api_keys_file_adds_keys_and_skips_comments(tmp_path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# ops\nsk-file-key-1:ops\n\n  sk-file-key-2  \n")
    args = build_parser().parse_args(["serve", "--api-key", "sk-flag-key-0:acme",
                                      "--api-keys-file", str(keys)])
    assert serve_config(args).api_keys == (("sk-flag-key-0", "acme"), ("sk-file-key-1", "ops"),
                                           ("sk-file-key-2", "default"))


# (id, the file's bytes, words of the one-line error: the line's number and what is wrong)
BAD_KEYS_FILES = [
    ("repeated-key", b"sk-file-key-1:ops\n# note\nsk-file-key-1:dev\n",
     "line 3: the key of line 1 again"),
    ("repeated-key-crlf", b"\xef\xbb\xbfsk-file-key-1\r\n\r\nsk-file-key-1 \r\n",
     "line 3: the key of line 1 again"),
    ("empty-key", b"sk-file-key-1\n:ops\n", "line 2: no key before the ':'"),
    ("empty-tenant", b"sk-file-key-1:\n", "line 1: no tenant after the ':'"),
    ("space-in-key", b"sk-file-key-1\nsk file key 2:ops\n", "line 2: an API key may hold only"),
    ("bom-inside", b"sk-file-key-1\n\xef\xbb\xbfsk-file-key-2\n", "line 2: an API key may hold"),
    ("utf16", "sk-file-key-1:ops\n".encode("utf-16"), "is not UTF-8 text"),
    ("short-key", b"# keys\n\nsk-1\n", "line 3: an API key needs at least 8 characters"),
]


@pytest.mark.parametrize(("content", "words"), [case[1:] for case in BAD_KEYS_FILES],
                         ids=[case[0] for case in BAD_KEYS_FILES])
def test_a_bad_keys_file_stops_serve_naming_the_line(tmp_path, content: bytes, words: str,
                                                     capsys) -> None:
    keys = tmp_path / "keys"
    keys.write_bytes(content)
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--api-keys-file", str(keys)])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(keys) in err and words in err, err
    assert "sk-file-key" not in err  # a key is never shown: the message goes to logs


def test_a_keys_file_key_given_by_flag_too_is_refused_naming_the_tenants(tmp_path,
                                                                       capsys) -> None:
    keys = tmp_path / "keys"
    keys.write_text("sk-file-key-1:ops\n")
    with pytest.raises(SystemExit):
        main(["serve", "--api-key", "sk-file-key-1:dev", "--api-keys-file", str(keys)])
    assert "given twice (for tenant 'dev' and for 'ops')" in capsys.readouterr().err


def test_a_keys_file_saved_with_a_bom_and_crlf_reads_the_same_keys(tmp_path) -> None:
    """Windows editors save UTF-8 with a byte-order mark and CRLF: the first key must not
    silently become another key (the BOM glued to it)."""
    keys = tmp_path / "keys"
    keys.write_bytes(b"\xef\xbb\xbfsk-file-key-1:ops\r\nsk-file-key-2\r\n\r\n")
    args = build_parser().parse_args(["serve", "--api-keys-file", str(keys)])
    assert serve_config(args).api_keys == (("sk-file-key-1", "ops"), ("sk-file-key-2", "default"))
