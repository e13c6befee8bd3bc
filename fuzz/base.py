"""The shape of a fuzz target."""


class Target:
    """``generate(r)`` makes one input from a random source ``r`` (a ``random.Random``,
    Hypothesis's ``st.randoms()`` or :class:`fuzz.common.BytesRandom`); ``run(inp)``
    feeds it to the code under test and checks the properties. Anything escaping
    ``run`` is a finding; documented exceptions are caught inside it."""

    name = "?"
    description = ""

    def generate(self, r):
        raise NotImplementedError

    def run(self, inp) -> None:
        raise NotImplementedError
