"""A tiny single-threaded TCP server for the connection benchmarks.

    python bench/tiny_server.py PORT

Accepts everything; answers ``OK\\n`` to each chunk it receives and closes when the
peer closes (so the client closes first and TIME_WAIT stays on the client side).
Prints ``ready`` once listening; runs until killed (the lab's teardown kills it).
"""
import selectors
import socket
import sys


def main() -> None:
    port = int(sys.argv[1])
    sel = selectors.DefaultSelector()
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(1024)
    ls.setblocking(False)
    sel.register(ls, selectors.EVENT_READ, None)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            if key.data is None:
                for _ in range(64):                 # drain the accept backlog, bounded
                    try:
                        conn, _ = ls.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, True)
                continue
            conn = key.fileobj
            try:
                data = conn.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                try:
                    conn.send(b"OK\n")
                except OSError:
                    pass
            else:
                sel.unregister(conn)
                conn.close()


if __name__ == "__main__":
    main()
