"""`kvrt serve --replicas 2` as a user runs it: a local Ray instance, two replicas of the tiny
model; it prints its ready line at once, answers 503 with Retry-After until a replica is ready,
serves a chat call, and exits cleanly on SIGTERM with every replica's KV released."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("ray")

READY = re.compile(r"^kvrt ready: serving (\S+) at (http://\S+)$")
READY_TIMEOUT_S = 120.0


def post_chat(url: str) -> tuple[int, dict[str, str], dict]:
    body = json.dumps({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4,
                       "temperature": 0}).encode()
    request = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


def test_serve_with_two_replicas_then_sigterm(tiny_checkpoint_dir) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvrt.runtime.cli", "serve", "--replicas", "2", "--port", "0",
         "--model", str(tiny_checkpoint_dir()), "--kv-cache-memory", "8MiB",
         "--max-model-len", "512", "--served-model-name", "tiny"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONSAFEPATH": "1"},
    )
    try:
        match = READY.match(proc.stdout.readline().rstrip("\n"))
        assert match, proc.stderr.read() if proc.poll() is not None else "no ready line"
        assert match.group(1) == "tiny"
        url = match.group(2)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while (reply := post_chat(url))[0] == 503:  # the replicas are still loading
            status, headers, body = reply
            assert int(headers["Retry-After"]) >= 1 and body["error"]["message"], reply
            assert time.monotonic() < deadline, "no replica became ready"
            time.sleep(0.5)
        status, _, body = reply
        assert status == 200, body
        assert body["model"] == "tiny" and body["usage"]["completion_tokens"] >= 1
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    assert re.search(r"replica [01]: starting -> ready", err), err  # one served the call
    for name in ("0", "1"):  # a replica still loading at SIGTERM was not serving
        assert re.search(rf"replica {name} stopped(; all request KV released| \(it was not "
                         r"serving\))", err), err
    assert "all request KV released" in err, err
