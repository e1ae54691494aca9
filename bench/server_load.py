"""The OpenAI-compatible server under load (issue 15): `tightfit serve` in a second process on
loopback, N client threads for a bounded time, a mix of plain and streaming, completion and chat
requests, some of whose clients leave mid-way (a plain request: after it was sent; a stream: after a
few chunks). More clients than --max-connections, so some are refused (429 with Retry-After) and
wait as Retry-After says.

It asserts (exit 1 and the list on failure): no answer of 500 or above; the server's peak RSS within
--rss-growth of its RSS after warm-up, and its threads within --max-connections of the warm count;
every request the clients made has exactly one outcome on the server (/health), all of them
completed, cancelled or refused, none failed, timed out or lost; every answer a client read whole
was complete and well formed; and the server still answers afterwards. Writes
bench/results/server_load.json + .md: requests/s, p50/p99 latency, peak RSS, the counts.

    .venv/bin/python bench/server_load.py [--model PATH] [--clients 16] [--seconds 60] [--max-connections 8]
Without --model it packs the default model (smollm2-135m) as w4g32 RTN into .cache/ once.
Run it alone: other processes on this 2-core machine share the cores with the server and clients.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, machine_line, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ("The history of the city begins", "Write a short note about rivers.", "Explain why the sky is blue.",
           "List three uses of copper.", "Once upon a time, a small robot")
KINDS = ("plain", "stream", "chat", "chat_stream")


@dataclass(frozen=True)
class LoadConfig:
    """One load run. The server gets max_queue = max_connections, so a full queue (503) cannot happen."""

    clients: int = 16
    seconds: float = 60.0
    max_connections: int = 8
    request_timeout: float = 120.0
    leave_share: float = 0.25  # requests whose client leaves mid-way
    max_tokens: tuple[int, int] = (8, 48)
    threads: int = 1  # the server's compute threads; the clients use the other core
    rss_growth: float = 0.25  # peak RSS may exceed the warm RSS by this share
    seed: int = 15


# ---- the server process --------------------------------------------------------------------------


class ServerProcess:
    """`tightfit serve` on 127.0.0.1, port chosen by the OS; stderr drained on a thread (last lines kept)."""

    def __init__(self, model: Path, config: LoadConfig) -> None:
        env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tightfit.cli", "serve", str(model), "--port", "0", "--model-name", "load",
             "--max-connections", str(config.max_connections), "--max-queue", str(config.max_connections),
             "--request-timeout", str(config.request_timeout), "--threads", str(config.threads)],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        self.lines: list[str] = []
        for line in self.proc.stderr:
            self.lines.append(line.rstrip())
            if m := re.search(r"serving '.*' on http://([\d.]+):(\d+)/v1", line):
                self.address = (m.group(1), int(m.group(2)))
                break
        else:
            raise RuntimeError("the server did not start:\n" + "\n".join(self.lines[-20:]))
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.lines = self.lines[-200:] + [line.rstrip()]

    def status(self) -> dict[str, int]:
        """VmRSS, VmHWM (peak RSS) in bytes and Threads, from /proc."""
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines())
        kib = {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}
        return kib | {"Threads": int(fields["Threads"])}

    def stop(self) -> int:
        self.proc.send_signal(2)  # SIGINT: the CLI's Ctrl-C path closes the server and exits 0
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


# ---- the clients ---------------------------------------------------------------------------------


def _body(kind: str, rng: random.Random, config: LoadConfig) -> dict:
    prompt = rng.choice(PROMPTS)
    body = {"model": "load", "max_tokens": rng.randint(*config.max_tokens), "temperature": rng.choice([0, 0.8]),
            "seed": rng.randrange(1000), "stream": kind.endswith("stream")}
    return body | ({"messages": [{"role": "user", "content": prompt}]} if kind.startswith("chat") else {"prompt": prompt})


def _complete(kind: str, status: int, payload: bytes) -> bool:
    """Whether an answer read whole is a complete, well-formed completion."""
    if status != 200:
        return False
    if not kind.endswith("stream"):
        answer = json.loads(payload)
        return answer["choices"][0]["finish_reason"] in ("stop", "length") and answer["usage"]["completion_tokens"] >= 1
    events = [b[len("data: "):] for b in payload.decode().split("\n\n") if b.strip()]
    return events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] in ("stop", "length")


def one_request(address: tuple[str, int], kind: str, body: dict, leave: bool, rng: random.Random,
                timeout: float) -> dict:
    """One request on its own connection: {"kind", "outcome", "status", "seconds", "retry_after"}.
    outcome: completed | cancelled (a stream left after its 200) | left (a plain request left unread) |
    rejected (429 or 503 with Retry-After) | error (anything else)."""
    path = "/v1/chat/completions" if kind.startswith("chat") else "/v1/completions"
    conn = http.client.HTTPConnection(*address, timeout=timeout)
    started = time.perf_counter()
    out = {"kind": kind, "status": None, "retry_after": None}
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        if leave and not body["stream"]:
            time.sleep(rng.uniform(0.05, 0.5))
            return out | {"outcome": "left", "seconds": time.perf_counter() - started}
        response = conn.getresponse()
        out["status"], out["retry_after"] = response.status, response.getheader("Retry-After")
        if response.status in (429, 503) and out["retry_after"]:
            response.read()
            return out | {"outcome": "rejected", "seconds": time.perf_counter() - started}
        if leave and response.status == 200:
            for _ in range(rng.randint(1, 4)):
                response.readline()
            return out | {"outcome": "cancelled", "seconds": time.perf_counter() - started}
        ok = _complete(kind, response.status, response.read())
        return out | {"outcome": "completed" if ok else "error", "seconds": time.perf_counter() - started}
    except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError) as e:
        return out | {"outcome": "error", "error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - started}
    finally:
        if conn.sock is not None and leave:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        conn.close()


def run_clients(address: tuple[str, int], config: LoadConfig) -> list[dict]:
    """config.clients threads sending requests back to back until config.seconds have passed."""
    results: list[dict] = []
    lock = threading.Lock()
    end = time.monotonic() + config.seconds

    def client(index: int) -> None:
        rng = random.Random(config.seed * 1000 + index)
        while time.monotonic() < end:
            kind = rng.choice(KINDS)
            r = one_request(address, kind, _body(kind, rng, config), rng.random() < config.leave_share, rng,
                            config.request_timeout + 30)
            with lock:
                results.append(r)
            if r["outcome"] == "rejected":
                time.sleep(min(float(r["retry_after"]), max(0.0, end - time.monotonic())))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(config.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(config.seconds + config.request_timeout + 60)
        assert not t.is_alive(), "a client never finished its request"
    return results


def _get(address: tuple[str, int], path: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(*address, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def run_load(model: Path, config: LoadConfig) -> dict:
    """Start the server, warm it up (one request of each kind), load it, check it; the report."""
    server = ServerProcess(model, config)
    try:
        rng = random.Random(config.seed)
        warm = [one_request(server.address, kind, _body(kind, rng, config), False, rng, config.request_timeout)
                for kind in KINDS]
        warm_status = server.status()
        peak = {"rss": 0, "threads": 0}
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.05):
                s = server.status()
                peak["rss"], peak["threads"] = max(peak["rss"], s["VmRSS"]), max(peak["threads"], s["Threads"])

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        started = time.perf_counter()
        results = run_clients(server.address, config)
        wall = time.perf_counter() - started
        done.set()
        watcher.join()
        client = Counter(r["outcome"] for r in results)
        deadline = time.monotonic() + 15  # the server notices a client that left within its poll interval
        while True:  # until every request is accounted for and every handler has ended (this GET's aside)
            _, health = _get(server.address, "/health")
            server_counts = health["requests"]
            settled = health["waiting"] == 0 and health["connections"] == 1
            if (settled and sum(server_counts.values()) >= len(results) + len(warm)) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        after = one_request(server.address, "plain", _body("plain", rng, config), False, rng, config.request_timeout)
        models_status, _ = _get(server.address, "/v1/models")
        final_status = server.status()
    finally:
        exit_code = server.stop()
    completed = [r for r in results if r["outcome"] == "completed"]
    latencies = [r["seconds"] for r in completed]
    return {
        "config": asdict(config), "model": str(model), "machine": machine_info(), "wall_s": wall,
        "requests": len(results), "client_outcomes": dict(client), "server_outcomes": server_counts,
        "warm_outcomes": dict(Counter(r["outcome"] for r in warm)),
        "statuses": dict(Counter(str(r["status"]) for r in results)),
        "errors": [r for r in results if r["outcome"] == "error"][:10],
        "requests_per_s": len(completed) / wall,
        "latency_p50_s": _percentile(latencies, 50), "latency_p99_s": _percentile(latencies, 99),
        "by_kind": {k: {"completed": sum(r["kind"] == k for r in completed),
                        "latency_p50_s": _percentile([r["seconds"] for r in completed if r["kind"] == k], 50)}
                    for k in KINDS},
        "warm_rss_bytes": warm_status["VmRSS"], "peak_rss_bytes": max(peak["rss"], final_status["VmRSS"]),
        "lifetime_peak_rss_bytes": final_status["VmHWM"],
        "warm_threads": warm_status["Threads"], "peak_threads": peak["threads"],
        "health_after": {k: health[k] for k in ("waiting", "connections")},
        "answers_after": after["outcome"] == "completed" and models_status == 200, "exit_code": exit_code,
        "server_log_tail": server.lines[-5:],
    }


def failures(report: dict) -> list[str]:
    """What the load run must show; empty when all holds."""
    config, client, server = report["config"], report["client_outcomes"], report["server_outcomes"]
    out = []
    fives = {s: n for s, n in report["statuses"].items() if s != "None" and int(s) >= 500}
    if fives:
        out.append(f"answers of 500 or above: {fives}")
    if report["warm_outcomes"] != {"completed": len(KINDS)}:
        out.append(f"the warm-up requests did not all complete: {report['warm_outcomes']}")
    if client.get("error"):
        out.append(f"{client['error']} requests failed on the client side, e.g. {report['errors'][:3]}")
    bad = {k: n for k, n in server.items() if k not in ("completed", "cancelled", "rejected")}
    if bad:
        out.append(f"server outcomes other than completed, cancelled or refused: {bad}")
    if sum(server.values()) != report["requests"] + len(KINDS):
        out.append(f"the server accounts for {sum(server.values())} requests, the clients made "
                   f"{report['requests']} (+{len(KINDS)} warm-up): some were lost")
    if server.get("completed", 0) < client.get("completed", 0) + len(KINDS):
        out.append("the server counts fewer completed requests than the clients read whole")
    limit = report["warm_rss_bytes"] * (1 + config["rss_growth"])
    if report["peak_rss_bytes"] > limit:
        out.append(f"peak RSS {report['peak_rss_bytes'] / 2**20:.0f} MiB exceeds {limit / 2**20:.0f} MiB "
                   f"(warm RSS + {config['rss_growth']:.0%})")
    if report["peak_threads"] > report["warm_threads"] + config["max_connections"]:
        out.append(f"{report['peak_threads']} server threads at peak: more than {report['warm_threads']} + "
                   f"{config['max_connections']} connections")
    if not report["answers_after"] or report["health_after"] != {"waiting": 0, "connections": 1}:
        out.append(f"the server does not answer as it should afterwards: {report['health_after']}")
    if report["exit_code"] != 0:
        out.append(f"the server exited with {report['exit_code']} on Ctrl-C")
    return out


# ---- the report ----------------------------------------------------------------------------------


def markdown(report: dict, problems: list[str]) -> str:
    c, s = report["config"], report["server_outcomes"]

    def ms(seconds: float | None) -> str:
        return "-" if seconds is None else f"{1000 * seconds:.0f}"

    lines = [
        "# The server under load", "",
        machine_line(report["machine"], c["threads"]), "",
        f"Model `{Path(report['model']).name}`; server: `tightfit serve --max-connections {c['max_connections']} "
        f"--max-queue {c['max_connections']} --request-timeout {c['request_timeout']:g} --threads {c['threads']}` in a "
        f"second process; {c['clients']} client threads on loopback for {c['seconds']:g} s, each request on its own "
        f"connection: plain, streaming, chat and chat streaming alike, max_tokens {c['max_tokens'][0]}-{c['max_tokens'][1]}, "
        f"{c['leave_share']:.0%} of clients leaving mid-way. Reproduce: `python bench/server_load.py --clients "
        f"{c['clients']} --seconds {c['seconds']:g} --max-connections {c['max_connections']} --threads {c['threads']}"
        f"{'' if report['default_model'] else ' --model ' + report['model']}`.", "",
        "| requests | completed/s | p50 latency ms | p99 latency ms | peak RSS MiB | warm RSS MiB | peak threads |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {report['requests']} | {report['requests_per_s']:.2f} | {ms(report['latency_p50_s'])} | "
        f"{ms(report['latency_p99_s'])} | {report['peak_rss_bytes'] / 2**20:.0f} | {report['warm_rss_bytes'] / 2**20:.0f} | "
        f"{report['peak_threads']} |", "",
        "| outcome | clients saw | server counted |", "|---|---:|---:|",
    ]
    client = report["client_outcomes"]
    for outcome in ("completed", "cancelled", "left", "rejected", "error"):
        lines.append(f"| {outcome} | {client.get(outcome, 0)} | {s.get(outcome, '-') if outcome != 'left' else '-'} |")
    lines += ["", f"Server totals include the {len(KINDS)} warm-up requests. A plain request whose client left before "
              "reading is `left` to the client and cancelled, refused or (when it had finished) completed to the server.",
              "Latency: from sending the request to the last byte of a complete answer. Peak RSS: the server's "
              f"resident memory sampled every 50 ms under load (its lifetime peak, model loading included, is "
              f"{report['lifetime_peak_rss_bytes'] / 2**20:.0f} MiB). "
              + ("All checks held." if not problems else "FAILED: " + "; ".join(problems))]
    return "\n".join(lines) + "\n"


def default_model() -> Path:
    """The default model packed as w4g32 RTN under .cache/ (built once)."""
    out = ROOT / ".cache" / "server_load-smollm2-135m-w4g32"
    if not (out / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "tightfit.cli", "compress", "smollm2-135m", "--format", "w4g32",
                        "--method", "rtn", "--no-eval", "--out", str(out)], check=True, cwd=ROOT)
    return out


def main() -> int:
    d = LoadConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="a packed model folder (default: smollm2-135m as w4g32)")
    p.add_argument("--clients", type=int, default=d.clients)
    p.add_argument("--seconds", type=float, default=d.seconds)
    p.add_argument("--max-connections", type=int, default=d.max_connections)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--no-write", action="store_true", help="check only; leave bench/results alone (a short run)")
    args = p.parse_args()
    config = LoadConfig(clients=args.clients, seconds=args.seconds, max_connections=args.max_connections, threads=args.threads)
    report = run_load(args.model or default_model(), config) | {"default_model": args.model is None}
    problems = failures(report)
    text = markdown(report, problems)
    print(text)
    if not args.no_write:
        write_results("server_load", report | {"failures": problems}, text)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
