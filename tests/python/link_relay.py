"""A network link as a userspace relay, for kernels without tc netem (this machine's has none).

Runs inside its own network namespace holding two interfaces without addresses, each one end
of a veth pair whose other end is in a "host" namespace. Every Ethernet frame that arrives on
one interface leaves by the other after the link's delay, unless the link drops it (random
loss, or a cut: every frame dropped, those in flight too). The hosts see one Ethernet segment
between them, ARP included; TCP sees real loss and real delay.

Usage: link_relay.py IFACE_A IFACE_B. Commands on stdin, one per line, each answered on stdout:
  set DELAY_MS LOSS_PERCENT   -> ok
  cut                         -> ok
  stats                       -> forwarded N dropped M
End of stdin (the test process gone) ends the relay.
"""

import heapq
import os
import random
import select
import socket
import sys
import time

ETH_P_ALL = 3
PACKET_OUTGOING = 4


def open_iface(name):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((name, 0))
    s.setblocking(False)
    return s


def main():
    sa, sb = open_iface(sys.argv[1]), open_iface(sys.argv[2])
    peer = {sa: sb, sb: sa}
    delay, loss, cut = 0.0, 0.0, False
    queue = []  # (due, seq, out socket, frame): one delay for all keeps the order
    seq = forwarded = dropped = 0
    stdin = sys.stdin.fileno()
    pending = b""
    print("ready", flush=True)
    while True:
        timeout = max(0.0, queue[0][0] - time.monotonic()) if queue else None
        readable, _, _ = select.select([sa, sb, stdin], [], [], timeout)
        for s in readable:
            if s == stdin:
                data = os.read(stdin, 4096)
                if not data:
                    return
                pending += data
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    words = line.decode().split()
                    if words[:1] == ["set"] and len(words) == 3:
                        delay, loss, cut = float(words[1]) / 1000.0, float(words[2]) / 100.0, False
                        print("ok", flush=True)
                    elif words == ["cut"]:
                        cut = True
                        dropped += len(queue)
                        queue.clear()
                        print("ok", flush=True)
                    elif words == ["stats"]:
                        print(f"forwarded {forwarded} dropped {dropped}", flush=True)
                    else:
                        print(f"error: unknown command {line!r}", flush=True)
                continue
            while True:
                try:
                    frame, addr = s.recvfrom(65535)
                except BlockingIOError:
                    break
                if addr[2] == PACKET_OUTGOING:
                    continue
                if cut or random.random() < loss:
                    dropped += 1
                    continue
                seq += 1
                heapq.heappush(queue, (time.monotonic() + delay, seq, peer[s], frame))
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, out, frame = heapq.heappop(queue)
            try:
                out.send(frame)
                forwarded += 1
            except OSError:
                dropped += 1


if __name__ == "__main__":
    main()
