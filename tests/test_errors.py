from __future__ import annotations

from vae.errors import describe_error


class Wrapper(Exception):
    """Like Ray's task errors: the text is a remote traceback, the original is in `cause`."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__("ray::Task() (pid=1)\n  File x.py, line 3\nOSError: [Errno 28] No space left on device")
        self.cause = cause


def test_one_line_with_the_type():
    assert describe_error(ValueError("bad thing\nmore detail")) == "ValueError: bad thing"
    assert describe_error(KeyError()) == "KeyError"
    assert describe_error(RuntimeError("  \n")) == "RuntimeError"


def test_a_first_line_that_announces_the_next_keeps_it():
    e = RuntimeError("Error(s) in loading state_dict for X:\n\tsize mismatch for conv.weight\n\tand more")
    assert describe_error(e) == "RuntimeError: Error(s) in loading state_dict for X: size mismatch for conv.weight"


def test_a_wrapped_error_is_described_by_its_cause_and_long_text_is_cut():
    assert describe_error(Wrapper(OSError(28, "No space left on device"))) == (
        "OSError: [Errno 28] No space left on device"
    )
    assert len(describe_error(ValueError("x" * 1000))) == 300
