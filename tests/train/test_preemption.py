import os
import signal

import pytest

from diffjax.train.preemption import StopRequest


def test_a_signal_asks_to_stop_and_a_second_one_interrupts():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest().installed() as stop:
        assert not stop.reached(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.reached(2) and stop.signal_name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before  # handlers are put back


def test_sigint_is_handled_like_sigterm():
    with StopRequest().installed() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.reached(1) and stop.signal_name == "SIGINT"
