"""A tiny single-threaded HTTP/1.0 server for ``ab`` without keep-alive.

    python bench/tiny_http.py PORT

Answers every request with a 2-byte body and closes first, as an HTTP/1.0 server
does (so TIME_WAIT stays on the server side, as with a real web server). Prints
``ready`` once listening; runs until killed (the lab's teardown kills it).
"""
import selectors
import socket
import sys

REPLY = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


def main() -> None:
    sel = selectors.DefaultSelector()
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", int(sys.argv[1])))
    ls.listen(4096)
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
                    sel.register(conn, selectors.EVENT_READ, bytearray())
                continue
            conn, request = key.fileobj, key.data
            try:
                data = conn.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            request += data
            if data and b"\r\n\r\n" not in request:
                continue                            # the rest of the request is coming
            if data:
                try:
                    conn.send(REPLY)
                except OSError:
                    pass
            sel.unregister(conn)
            conn.close()


if __name__ == "__main__":
    main()
