"""Where a tightfit command's memory goes: runs it in this process while a thread samples the RSS
and the main thread's stack every 50 ms; prints the stack at each 0.5 GB step up or down and at the
peak (issue 11: every memory fix for the 1.5B model was found this way).

    .venv/bin/python bench/memory_profile.py compress qwen2.5-coder-1.5b --bpw 4.3 --first-blocks 2 --out /tmp/x

Costs that scale with the vocabulary (embeddings, head, logits) show up as well on `--first-blocks 2`
as on the whole model. RSS here counts every page the process touched, mapped files included.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback

STEP_BYTES = 5e8
PERIOD_S = 0.05


def where(thread_id: int, depth: int) -> str:
    frame = sys._current_frames().get(thread_id)
    stack = traceback.extract_stack(frame)[::-1][:depth]
    return " < ".join(f"{os.path.basename(s.filename)}:{s.lineno}:{s.name}" for s in stack)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:  # Linux: resident pages are the second field
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def anon_bytes() -> int:
    """Resident anonymous memory (RssAnon): what the OOM killer weighs; mapped file pages can be dropped."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024  # kB
    return 0


def sample(main_id: int, peak: list) -> None:
    last = 0
    while True:
        rss = rss_bytes()
        if rss > peak[0]:
            peak[:2] = [rss, where(main_id, 6)]
        peak[2] = max(peak[2], anon_bytes())
        if abs(rss - last) > STEP_BYTES:
            print(f"[mem] {rss / 1e9:.2f} GB  {where(main_id, 5)}", file=sys.stderr, flush=True)
            last = rss
        time.sleep(PERIOD_S)


if __name__ == "__main__":
    from tightfit.cli import main

    peak = [0, "", 0]  # RSS, where, anonymous RSS
    threading.Thread(target=sample, args=(threading.main_thread().ident, peak), daemon=True).start()
    try:
        rc = main(sys.argv[1:])
    finally:
        print(f"[mem] peak {peak[0] / 1e9:.3f} GB at {peak[1]}; peak anonymous {peak[2] / 1e9:.3f} GB", file=sys.stderr)
    sys.exit(rc)
