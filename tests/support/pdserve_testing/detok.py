"""A detokenizer stand-in for the router's pure-logic tests."""


class CharDetok:
    """Stand-in detokenizer: token id i is chr(i)."""

    def add(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)

    def flush(self) -> str:
        return ""
