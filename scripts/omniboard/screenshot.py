"""A PNG of Omniboard's runs table, taken by headless Chromium: what a user sees of the records.

    python scripts/omniboard/screenshot.py --mongo 127.0.0.1:27017:mess -o omniboard.png
    python scripts/omniboard/screenshot.py --demo -o omniboard.png   # a fresh database, one digits run

Needs Omniboard (``cd scripts/omniboard && npm ci``) and a Chromium (``apt-get install
chromium-headless-shell``, or ``chromium``). ``--demo`` starts SecantusDB (requirements-dev.txt)
in a temporary folder and records one two-epoch digits training into it first. The run's
command, experiment name, config columns, result and the headline columns (best top-1, ratio)
are what the picture is for; tests/test_tracking.py takes one in its slow tier.
"""
from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OMNIBOARD = HERE / "node_modules" / "omniboard" / "dist" / "start.js"
BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")


def find_browser() -> str | None:
    return next((b for b in map(shutil.which, BROWSERS) if b), None)


@contextmanager
def omniboard(mongo: str, timeout: float = 60.0):
    """Omniboard on 127.0.0.1 (a free port) reading ``host:port:database``; yields its base URL."""
    if not OMNIBOARD.is_file() or not shutil.which("node"):
        raise SystemExit("Omniboard is not installed: cd scripts/omniboard && npm ci")
    proc = subprocess.Popen(["node", "-r", str(HERE / "localhost.js"), str(OMNIBOARD), "-m", mongo],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PORT="0"))
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True).start()
    try:
        seen, port, deadline = [], None, time.monotonic() + timeout
        while port is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                continue
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", seen[-1])
            port = int(m.group(1)) if m else None
        if port is None:
            raise RuntimeError("Omniboard did not start: " + "".join(seen))
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def take(url: str, out: Path, browser: str, size=(1800, 700), wait_ms: int = 15000) -> Path:
    """Load ``url`` in headless Chromium, let its scripts run ``wait_ms`` (virtual time), save a PNG."""
    out = Path(out).resolve()
    with tempfile.TemporaryDirectory() as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
               f"--virtual-time-budget={wait_ms}", f"--screenshot={out}", url]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if not out.is_file():
        raise RuntimeError(f"{Path(browser).name} wrote no screenshot (exit {p.returncode}): "
                           f"{p.stderr[-500:]}")
    return out


def demo_database(folder: Path):
    """SecantusDB in ``folder`` with one recorded digits training; returns the server (stop() it)."""
    import secantus
    server = secantus.SecantusDBServer(host="127.0.0.1", port=0, storage_path=str(folder / "db"),
                                       replica_set_name=None)
    server.start()
    argv = ["digits", "-a", "resnet", "--layers", "20", "--width-mult", "0.25", "-j", "0", "--epochs", "2",
            "--ckpt-dir", "ck", "--mongo-url", server.uri, "--mongo-db", "mess"]
    p = subprocess.run([sys.executable, str(ROOT / "main.py"), *argv], cwd=folder, capture_output=True,
                       text=True)
    if p.returncode:
        server.stop()
        raise RuntimeError(p.stderr)
    return server


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mongo", metavar="HOST:PORT:DB", help="the database Omniboard reads")
    parser.add_argument("--demo", action="store_true", help="record one digits run into a fresh database")
    parser.add_argument("-o", "--out", default="omniboard.png", help="the PNG (default: omniboard.png)")
    parser.add_argument("--width", type=int, default=2400, help="window width in pixels; Omniboard's "
                        "table runs to a column per flag, the headline ones last (default: 2400)")
    args = parser.parse_args(argv)
    browser = find_browser()
    if browser is None:
        parser.error("no Chromium found: apt-get install chromium-headless-shell (or chromium)")
    if bool(args.mongo) == args.demo:
        parser.error("give --mongo HOST:PORT:DB or --demo")
    with tempfile.TemporaryDirectory() as tmp:
        server = demo_database(Path(tmp)) if args.demo else None
        try:
            mongo = f"127.0.0.1:{server.port}:mess" if server else args.mongo
            with omniboard(mongo) as url:
                out = take(url, Path(args.out), browser, size=(args.width, 420))
        finally:
            if server:
                server.stop()
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
