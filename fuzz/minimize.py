"""Shrinking a finding: drop steps (translator and resolver scenarios) and trailing
bytes while the same failure (exception type, message, place) still happens."""
import traceback


def signature(exc: BaseException) -> tuple:
    tb = traceback.extract_tb(exc.__traceback__)
    where = tb[-1] if tb else None
    return (type(exc).__name__, str(exc) if isinstance(exc, AssertionError) else "",
            where.filename if where else "", where.lineno if where else 0)


def failure(target, inp):
    try:
        target.run(inp)
    except Exception as exc:      # noqa: BLE001 - every escape is a finding
        return signature(exc)
    return None


def minimize(target, inp, budget: int = 2000):
    want = failure(target, inp)
    if want is None:
        return inp
    tries = 0

    def same(candidate) -> bool:
        nonlocal tries
        tries += 1
        return failure(target, candidate) == want

    # scenarios: a tuple whose last item is a list of steps
    if isinstance(inp, tuple) and inp and isinstance(inp[-1], list):
        steps = list(inp[-1])
        i = 0
        while i < len(steps) and tries < budget:
            cand = steps[:i] + steps[i + 1:]
            if same(inp[:-1] + (cand,)):
                steps = cand
            else:
                i += 1
        inp = inp[:-1] + (steps,)
    return inp
