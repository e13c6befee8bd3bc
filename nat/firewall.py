"""iptables chains owned by one gateway instance, installed atomically, reversible.

Rules live in the **raw** table: it runs before conntrack, so the gateway rewrites
packets before conntrack records the untranslated tuple.

Per instance there are two chains, ``SERVAL-<tag>-PRE`` and ``SERVAL-<tag>-OUT``, jumped
to from PREROUTING and OUTPUT by one rule each that carries
``-m comment --comment serval:<tag>`` and lets no packet with the gateway's mark in. ``<tag>`` is :func:`nat.state.instance_tag`: the
instance name with characters outside ``[A-Za-z0-9_-]`` replaced by ``_`` and, beyond 17
characters, shortened to 10 characters + ``_`` + 6 hex digits of its SHA-1, so chain
names stay within iptables' 28 characters and a later run finds the same names.

Every change is one ``iptables-restore --noflush`` transaction: it either applies whole
or not at all. The pure ``render_*``/``parse_save`` functions are unit-tested without root.
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import NamedTuple, Callable, Iterable, Sequence

from .state import StateFile, instance_tag

DEFAULT_MARK = 0x5E7A1
CHAIN_PREFIX = 'SERVAL-'
COMMENT_PREFIX = 'serval:'
TABLE = 'raw'
HOOKS = ('PREROUTING', 'OUTPUT')


class FirewallError(RuntimeError):
    """An iptables command failed; names the command, its exit status and stderr."""

    def __init__(self, cmd: Sequence[str], returncode: int, stderr: str, stdin: str | None = None):
        self.cmd, self.returncode, self.stderr, self.stdin = list(cmd), returncode, stderr, stdin
        msg = f'{shlex.join(self.cmd)} failed (exit {returncode}): {stderr.strip()}'
        if stdin:
            msg += '\n--- input ---\n' + stdin
        super().__init__(msg)


# --- pure part: parse iptables-save, render iptables-restore input -------------------

@dataclass
class Table:
    name: str
    chains: dict[str, str] = field(default_factory=dict)  # chain -> policy ('-' if user)
    rules: list[str] = field(default_factory=list)        # '-A CHAIN ...' lines as saved


def parse_save(text: str) -> dict[str, Table]:
    """Tables of an ``iptables-save`` dump (comments and counters ignored)."""
    tables: dict[str, Table] = {}
    cur: Table | None = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith('*'):
            cur = tables.setdefault(line[1:], Table(line[1:]))
        elif cur is None or not line or line.startswith('#') or line == 'COMMIT':
            continue
        elif line.startswith(':'):
            name, policy = (line[1:].split() + ['-'])[:2]
            cur.chains[name] = policy
        elif line.startswith('-A '):
            cur.rules.append(line)
    return tables


def rule_chain(rule: str) -> str:
    return shlex.split(rule)[1]


def rule_target(rule: str) -> str | None:
    """Target of a saved rule (``-j X`` or ``-g X``)."""
    toks = shlex.split(rule)
    for i, tok in enumerate(toks[:-1]):
        if tok in ('-j', '--jump', '-g', '--goto'):
            return toks[i + 1]
    return None


def rule_comment(rule: str) -> str | None:
    toks = shlex.split(rule)
    for i, tok in enumerate(toks[:-1]):
        if tok == '--comment':
            return toks[i + 1]
    return None


def is_pristine(table: Table | None) -> bool:
    """True if the table holds nothing but its built-in chains with ACCEPT policy."""
    return table is not None and not table.rules and all(
        p == 'ACCEPT' for p in table.chains.values())


def _quote(arg: str) -> str:
    # iptables-restore splits on blanks and understands double quotes, nothing more.
    if any(c in arg for c in '"\n\r\0'):
        raise ValueError(f'unsupported character in iptables argument {arg!r}')
    return f'"{arg}"' if (not arg or any(c.isspace() for c in arg)) else arg


def render_removal(tables: dict[str, Table], owns_chain: Callable[[str], bool],
                   owns_comment: Callable[[str | None], bool]) -> str:
    """iptables-restore input deleting owned chains and every rule that jumps to them
    or carries an owned comment; '' if there is nothing to delete."""
    out: list[str] = []
    for t in tables.values():
        own = [c for c in t.chains if owns_chain(c)]
        doomed = [r for r in t.rules if not owns_chain(rule_chain(r)) and (
            rule_target(r) in own or owns_comment(rule_comment(r)))]
        if not own and not doomed:
            continue
        out.append(f'*{t.name}')
        out += ['-D' + r[2:] for r in doomed]
        out += [f'-F {c}' for c in own] + [f'-X {c}' for c in own]
        out.append('COMMIT')
    return '\n'.join(out) + '\n' if out else ''


def chain_names(tag: str) -> dict[str, str]:
    return {'PREROUTING': f'{CHAIN_PREFIX}{tag}-PRE', 'OUTPUT': f'{CHAIN_PREFIX}{tag}-OUT'}


class ToQueue(NamedTuple):
    """A rule for another queue than the instance's own (e.g. a priority queue), or
    one that fails closed: with ``bypass=False`` its packets are dropped, not passed,
    while no daemon reads the queue."""
    match: Sequence[str]
    queue: int
    bypass: bool | None = None     # None: the instance's setting


def render_install(tag: str, queue: int, bypass: bool, mark: int,
                   rules: dict[str, Iterable[Sequence[str]]], current: Table | None) -> str:
    """iptables-restore input that (re)creates the instance's chains with ``rules``
    (hook -> list of match-arg lists, or ``ToQueue``) and exactly one jump from each
    hook, first."""
    chains = chain_names(tag)
    comment = COMMENT_PREFIX + tag

    def target(q: int, bp: bool | None) -> list[str]:
        return ['-j', 'NFQUEUE', '--queue-num', str(int(q))] + (
            ['--queue-bypass'] if (bypass if bp is None else bp) else [])

    out = ['*' + TABLE] + [f':{c} - [0:0]' for c in chains.values()]  # declaring flushes
    if current is not None:  # drop old jumps so the fresh one is the only copy
        out += ['-D' + r[2:] for r in current.rules
                if rule_chain(r) in chains and (rule_target(r) in chains.values()
                                                or rule_comment(r) == comment)]
    for hook, chain in chains.items():
        for match in rules.get(hook, ()):
            q, bp = queue, None
            if isinstance(match, ToQueue):
                match, q, bp = match
            if isinstance(match, str):
                raise TypeError(f'a rule is a list of arguments, not a string: {match!r}')
            if any(a in ('-j', '--jump', '-g', '--goto') for a in match):
                raise ValueError(f'rule must not name a target, it is added: {match!r}')
            out.append(' '.join(['-A', chain] + [_quote(str(a)) for a in match] + target(q, bp)))
    # Packets carrying the mark (those the gateway injects, SO_MARK; those its kernel fast
    # path translated) never enter the chains. The mark is tested first on the jump: a
    # register compare, where the comment is a compat match, so a marked packet costs
    # the hook one rule's compare.
    out += [f'-I {hook} 1 -m mark ! --mark {mark:#x} -m comment --comment {comment} -j {chain}'
            for hook, chain in chains.items()]
    out.append('COMMIT')
    return '\n'.join(out) + '\n'


# --- impure part: run iptables --------------------------------------------------------

def run(cmd: Sequence[str], stdin: str | None = None) -> str:
    try:
        p = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False)
    except OSError as e:
        raise FirewallError(cmd, -1, str(e), stdin) from None
    if p.returncode:
        raise FirewallError(cmd, p.returncode, p.stderr, stdin)
    return p.stdout


def save(iptables: str = 'iptables') -> dict[str, Table]:
    return parse_save(run([f'{iptables}-save']))


def restore(ruleset: str, iptables: str = 'iptables') -> None:
    """Apply ``ruleset`` as one transaction, keeping everything it does not name."""
    if ruleset:
        run([f'{iptables}-restore', '-w', '5', '--noflush'], ruleset)


class Firewall:
    """The instance's chains in the raw table; see the module docstring for names.

    ``install`` is idempotent; ``remove`` leaves ``iptables-save`` as before install,
    including, with the nf_tables backend and ``nft`` present, deleting the raw table if
    install created it and it is empty again (an absent table is not listed by
    iptables-save, an empty one is).
    """

    def __init__(self, instance: str, queue: int, bypass: bool = True, mark: int = DEFAULT_MARK,
                 state_dir: str | None = None, iptables: str = 'iptables'):
        self.tag = instance_tag(instance)
        self.queue, self.bypass, self.mark = queue, bypass, mark
        self.iptables = iptables
        self.state = StateFile(instance, state_dir)
        self.chains = chain_names(self.tag)

    def save(self) -> dict[str, Table]:
        return save(self.iptables)

    def restore(self, ruleset: str) -> None:
        restore(ruleset, self.iptables)

    def render(self, prerouting: Iterable[Sequence[str]], output: Iterable[Sequence[str]],
               current: Table | None = None) -> str:
        return render_install(self.tag, self.queue, self.bypass, self.mark,
                              {'PREROUTING': prerouting, 'OUTPUT': output}, current)

    def install(self, prerouting: Iterable[Sequence[str]], output: Iterable[Sequence[str]]) -> None:
        tables = self.save()
        if TABLE not in tables and self._nft_backend():
            self.state.update('firewall', lambda s: {**(s or {}), 'created_raw': True})
        try:
            self.restore(self.render(prerouting, output, tables.get(TABLE)))
        except Exception:
            self._drop_raw_if_ours()
            raise

    def remove(self) -> None:
        own = set(self.chains.values())
        comment = COMMENT_PREFIX + self.tag
        self.restore(render_removal(self.save(), lambda c: c in own, lambda c: c == comment))
        self._drop_raw_if_ours()

    @classmethod
    def cleanup_stale(cls, instance: str, state_dir: str | None = None) -> None:
        """Undo a crashed run of ``instance``: chains, jumps, sysctls and routes."""
        from .interception import cleanup
        cleanup(instance, state_dir)

    def _nft_backend(self) -> bool:
        return 'nf_tables' in run([self.iptables, '-V']) and shutil.which('nft') is not None

    def _drop_raw_if_ours(self) -> None:
        if not (self.state.get('firewall') or {}).get('created_raw'):
            return
        if is_pristine(self.save().get(TABLE)):
            run(['nft', 'delete', 'table', 'ip', TABLE])
        self.state.update('firewall', lambda s: {k: v for k, v in (s or {}).items()
                                                 if k != 'created_raw'})


def cleanup_all_rules(iptables: str = 'iptables') -> None:
    """Remove every ``SERVAL-`` chain and ``serval:`` rule, in every table of this netns."""
    restore(render_removal(save(iptables), lambda c: c.startswith(CHAIN_PREFIX),
                           lambda c: bool(c) and c.startswith(COMMENT_PREFIX)), iptables)
