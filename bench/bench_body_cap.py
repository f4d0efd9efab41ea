"""The body cap against a 300 MB body: time to the 413 and the server's memory.

Starts the embedqa package's real Truss server (tiny random-weight checkpoint, default
`MAX_REQUEST_BYTES` of 64 MiB) and sends, over a raw socket, bodies far over the cap:

- declared: `Content-Length: 300000000`, then the body in 1 MiB writes;
- streamed: `Transfer-Encoding: chunked`, 300 MB of 1 MiB chunks, no length.

For each it reports the time from the request head to the first response byte, the status,
how many body bytes were written by then, and the server's RSS: its peak while the request ran
(sampled every 20 ms) and its level 2 s after, both against the level before. The client stops
writing as soon as the answer (or a closed connection) arrives.

Run: python bench/bench_body_cap.py [--mb 300] [--repeat 2]
"""

from __future__ import annotations

import argparse
import select
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "shared")]

from tools.local_server import TrussServer  # noqa: E402

CHUNK = 1 << 20


def _sample_rss(proc: psutil.Process, stop: threading.Event, peak: list[int]) -> None:
    while not stop.is_set():
        try:
            peak[0] = max(peak[0], proc.memory_info().rss)
        except psutil.Error:
            return
        time.sleep(0.02)


def send_big(url_port: int, total: int, chunked: bool) -> dict[str, object]:
    sock = socket.create_connection(("127.0.0.1", url_port))
    head = (
        "POST /v1/models/model:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + ("Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {total}\r\n")
        + "\r\n"
    )
    body = b'{"queries": ["' + b"a" * (CHUNK - 14)
    start = time.perf_counter()
    sock.sendall(head.encode())
    sent, answer, status = 0, b"", "none"
    sock.setblocking(False)
    try:
        while True:
            readable, writable, _ = select.select([sock], [sock] if sent < total else [], [], 60)
            if readable:
                answer = sock.recv(4096)
                status = answer.split(b" ", 2)[1].decode() if answer else "closed"
                break
            if not readable and not writable:
                status = "timeout"
                break
            piece = body if sent + len(body) <= total else body[: total - sent]
            data = b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece
            sock.setblocking(True)
            sock.sendall(data)
            sent += len(piece)
            if chunked and sent >= total:
                sock.sendall(b"0\r\n\r\n")
            sock.setblocking(False)
    except (BrokenPipeError, ConnectionResetError):
        status = "reset"
    elapsed = time.perf_counter() - start
    sock.close()
    return {"status": status, "seconds": elapsed, "sent_mb": sent / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    from embed_serving.tiny import write_tiny_embedqa

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "ckpt"
        write_tiny_embedqa(checkpoint, 0)
        server = TrussServer("embedqa-1b-v2", checkpoint, Path(tmp), {})
        try:
            proc = psutil.Process(server.proc.pid)
            print("| body | run | status | time to answer (s) | MB written | RSS before (MB) "
                  "| peak (MB) | 2 s after (MB) |")  # fmt: skip
            print("|---|---|---|---|---|---|---|---|")
            for run in range(args.repeat):
                for chunked in (False, True):
                    before = proc.memory_info().rss
                    peak, stop = [before], threading.Event()
                    sampler = threading.Thread(target=_sample_rss, args=(proc, stop, peak))
                    sampler.start()
                    result = send_big(server.port, args.mb * 1_000_000, chunked)
                    time.sleep(2)
                    stop.set()
                    sampler.join()
                    after = proc.memory_info().rss
                    print(
                        f"| {'streamed' if chunked else 'declared'} {args.mb} MB | {run} "
                        f"| {result['status']} | {result['seconds']:.2f} | {result['sent_mb']:.0f} "
                        f"| {before / 1e6:.0f} | {peak[0] / 1e6:.0f} | {after / 1e6:.0f} |"
                    )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
