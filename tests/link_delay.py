"""A link with added delay for simulated hosts, since this kernel has no netem: two TAP devices
per link, and every Ethernet frame that leaves one is written into the other `--delay-ms` later,
in both directions, in order.

    python tests/link_delay.py --delay-ms 1 outerA:innerA [outerB:innerB ...]

It makes the TAP pairs (they live as long as this process holds them), prints "ready", and
relays until its stdin closes; tests/netns.py then moves each inner end into its namespace
and joins each outer end to the bridge. A link taken down drops what is written into it, as
a pulled cable would.

One reader and one writer thread per direction: a reader stamps each frame as it arrives (a
blocking read, so nothing waits behind a sleeping writer), a writer sleeps until each frame is
due. Run under SCHED_FIFO where allowed, so busy ranks on the same cores do not stretch the
delay.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import os
import struct
import sys
import threading
import time

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000  # frames only, no packet-information header
MAX_FRAME = 65536


def open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


class DelayedDirection:
    """Frames read from `source`, written to `sink` `delay` seconds after each was read."""

    def __init__(self, source: int, sink: int, delay: float) -> None:
        self.source, self.sink, self.delay = source, sink, delay
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.ready = threading.Condition()
        for work in (self.read, self.write):
            threading.Thread(target=work, daemon=True).start()

    def read(self) -> None:
        while True:
            try:
                frame = os.read(self.source, MAX_FRAME)
            except OSError:  # the link is down or going away: nothing to read for now
                time.sleep(0.01)
                continue
            with self.ready:
                self.queue.append((time.monotonic() + self.delay, frame))
                self.ready.notify()

    def write(self) -> None:
        while True:
            with self.ready:
                while not self.queue:
                    self.ready.wait()
                due, frame = self.queue.popleft()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            with contextlib.suppress(OSError):  # a link that is down drops the frame
                os.write(self.sink, frame)


def run_in_real_time() -> None:
    """Best effort: without the privilege the relay still works, with a looser delay."""
    with contextlib.suppress(AttributeError, OSError, PermissionError):
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delay-ms", type=float, required=True, help="added one-way delay of every link")
    parser.add_argument("links", nargs="+", help="outer:inner TAP names, one pair per link")
    args = parser.parse_args(argv)
    run_in_real_time()  # before the threads start: they inherit the policy
    delay = args.delay_ms / 1000
    for link in args.links:
        outer, _, inner = link.partition(":")
        outer_fd, inner_fd = open_tap(outer), open_tap(inner)
        DelayedDirection(outer_fd, inner_fd, delay)
        DelayedDirection(inner_fd, outer_fd, delay)
    print("ready", flush=True)
    sys.stdin.read()  # until whoever started us closes our stdin, or goes
    return 0


if __name__ == "__main__":
    sys.exit(main())
