"""The start-up line that says how each NFQUEUE was sized (gateway/adapters/nfqueue.py)."""
import logging

from gateway.adapters.nfqueue import MESSAGE_COST, QUEUE_LEN, sizing_line


def test_a_queue_that_got_its_buffer_is_reported_plainly():
    wanted = QUEUE_LEN * MESSAGE_COST
    level, line = sizing_line(3, QUEUE_LEN, wanted, wanted)
    assert level == logging.INFO
    assert line.startswith(f"queue 3: holds up to {QUEUE_LEN} packets")
    assert "fail-open off" in line


def test_a_short_socket_buffer_is_a_warning_that_says_what_to_do():
    wanted = QUEUE_LEN * MESSAGE_COST
    got = 425_984                       # SO_RCVBUF capped by a default net.core.rmem_max (212,992)
    level, line = sizing_line(0, QUEUE_LEN, wanted, got)
    assert level == logging.WARNING
    assert f"about {got // MESSAGE_COST} packets" in line
    assert "kernel_user_dropped" in line
    assert f"net.core.rmem_max to at least {wanted // 2}" in line and "CAP_NET_ADMIN" in line


def test_the_queue_holds_a_burst_of_ten_thousand_closes():
    # issue 13: 10,000 closes at once put ~43,500 packets on one queue
    assert QUEUE_LEN >= 43_520
