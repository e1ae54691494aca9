"""A short run of bench/server_load.py on the tiny packed model: `tightfit serve` in a second process,
more clients than connections, some leaving mid-way, for a few seconds; every check of the bench holds
and each kind of outcome (completed, cancelled, refused) occurred."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import server_load  # noqa: E402


def test_server_under_a_short_load(packed_llama: Path) -> None:
    config = server_load.LoadConfig(clients=6, seconds=4, max_connections=2, max_tokens=(4, 16), request_timeout=30,
                                    leave_share=0.3)
    report = server_load.run_load(packed_llama, config) | {"default_model": False}
    problems = server_load.failures(report)
    assert problems == [], (problems, report["server_log_tail"])
    client, server = report["client_outcomes"], report["server_outcomes"]
    assert client.get("completed", 0) > 0 and client.get("rejected", 0) > 0 and client.get("left", 0) + client.get("cancelled", 0) > 0
    assert server.get("cancelled", 0) > 0  # the server saw clients leave, not only finished their answers
    assert report["requests_per_s"] > 0 and 0 < report["latency_p50_s"] <= report["latency_p99_s"]
    text = server_load.markdown(report, problems)
    assert "All checks held." in text and f"| {report['requests']} |" in text
    broken = report | {"statuses": report["statuses"] | {"500": 1}, "peak_rss_bytes": 10 * report["warm_rss_bytes"],
                        "server_outcomes": server | {"completed": server["completed"] - 1}}
    found = server_load.failures(broken)  # the checks can fail: a 500, an RSS blow-up, a lost request
    assert [f.split(" ")[0] for f in found] == ["answers", "the", "peak"], found
    print(text)
