"""Stop strings and text streaming of a router-side request (pure logic)."""

from pdserve.engine.sequence import SamplingParams
from pdserve.router.request import Request
from pdserve.router.slo import ValidSlo
from pdserve_testing.detok import CharDetok


def make(stop: tuple[str, ...]) -> Request:
    return Request("r", [1], SamplingParams(), stop, ValidSlo(None, None), 0.0,
                   CharDetok())  # type: ignore[arg-type]


def feed(req: Request, text: str) -> tuple[str, str | None]:
    out = ""
    for ch in text:
        piece, hit = req.add_tokens([ord(ch)])
        out += piece
        if hit is not None:
            return out, hit
    return out + req.flush(), None


def test_stop_string_never_leaks() -> None:
    req = make(("STOP",))
    out, hit = feed(req, "hello STOP world")
    assert out == "hello " and hit == "STOP"


def test_partial_stop_is_held_then_released() -> None:
    req = make(("STOP",))
    piece, _ = req.add_tokens([ord(c) for c in "abST"])
    assert piece == "ab"  # "ST" might begin STOP
    piece, _ = req.add_tokens([ord("x")])
    assert piece == "STx"


def test_earliest_of_several_stops_wins() -> None:
    req = make(("world", "lo w"))
    out, hit = feed(req, "hello world")
    assert out == "hel" and hit == "lo w"


def test_stop_spanning_tokens() -> None:
    req = make(("\n\n",))
    piece, hit = req.add_tokens([ord("a"), ord("\n")])
    assert (piece, hit) == ("a", None)
    piece, hit = req.add_tokens([ord("\n"), ord("b")])
    assert (piece, hit) == ("", "\n\n")


def test_no_stop_streams_everything() -> None:
    req = make(())
    out, hit = feed(req, "plain text")
    assert out == "plain text" and hit is None


def _min_tokens(stop: tuple[str, ...], min_tokens: int) -> Request:
    return Request("r", [1], SamplingParams(max_tokens=64, min_tokens=min_tokens), stop,
                   ValidSlo(None, None), 0.0, CharDetok())  # type: ignore[arg-type]


def test_stop_strings_wait_for_min_tokens() -> None:
    # "ab" appears within the first 4 tokens: it does not stop the request (vLLM's rule),
    # nor is it found later; the one after them does.
    req = _min_tokens(("ab",), 4)
    out, hit = feed(req, "xabyzabq")
    assert out == "xabyz" and hit == "ab"
    assert req.output_ids == [ord(c) for c in "xabyzab"]


def test_a_stop_string_may_end_on_the_min_tokens_th_token() -> None:
    req = _min_tokens(("ab",), 3)
    out, hit = feed(req, "xyab")  # tokens 1-3 are "xya": only "b" (the 4th) ends a stop
    assert hit == "ab" and out == "xy"
    req = _min_tokens(("ab",), 2)
    out, hit = feed(req, "xab")  # the 2nd token ("a") starts it, the 3rd ends it: found
    assert hit == "ab" and out == "x"
