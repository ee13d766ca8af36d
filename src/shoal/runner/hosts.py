"""Host lists of ``shoal run`` and the command line that starts an agent on a host.

Design constraints:

1. A host is a name the network knows, nothing else: a DNS name, an IPv4 address or a bracketed IPv6
   address (``[::1]``, as in URLs), so that ``:SLOTS`` stays unambiguous (``-H ::1`` once parsed as
   host ``':'``). Everything else is refused with a HINT before anything starts.
2. A host name reaches a remote command's argv and, through ssh, a remote shell: a name that starts
   with ``-`` would be an ssh option (``-oProxyCommand=...`` runs a command here), one with a space or
   ``;`` would be more words for the remote shell. Constraint 1 already keeps both out; on top of that,
   an ssh template gets ``--`` before the host (the end of ssh's options) and every word of the remote
   command is quoted for the remote shell, the interpreter path included (defence in depth: the check
   and the quoting each suffice alone).
3. The template is a template of words: it is split first (``shlex``) and ``{host}`` is replaced in
   each word, so a host can never add a word. ``{host}`` is its only field.

What lives elsewhere: starting and watching the agents (:mod:`shoal.runner.launch`).
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import string
from typing import Sequence

__all__ = [
    "DEFAULT_REMOTE_COMMAND",
    "parse_hosts",
    "parse_hostfile",
    "parse_address",
    "place_ranks",
    "check_remote_command",
    "remote_argv",
    "format_host",
]

#: ssh never prompts in batch mode: a missing key fails at once instead of hanging the launch.
DEFAULT_REMOTE_COMMAND = "ssh -o BatchMode=yes {host}"

# A DNS name: dot-separated labels of letters, digits, '-' and '_' (underscores are not DNS but appear in
# container and namespace names), no label starting or ending with '-', at most 253 characters. A first
# '-' would make the name an option of ssh (constraint 2).
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_HINT = ("HINT: a host is a DNS name, an IPv4 address or an IPv6 address in brackets, with :SLOTS after "
         "it, e.g. -H node1:2,10.0.0.2:2,[fd00::3]:2.")


def _host_error(text: str, where: str, why: str) -> ValueError:
    place = f" in {where!r}" if where != text else ""
    return ValueError(f"shoal: cannot use host {text!r}{place}: {why}. {_HINT}")


def _check_name(name: str, where: str) -> str:
    """``name`` if it is a DNS name or an IPv4 address (constraint 1), else ValueError."""
    if re.fullmatch(r"[0-9.]+", name):  # all digits: an IPv4 address or nothing
        try:
            return str(ipaddress.IPv4Address(name))
        except ValueError:
            raise _host_error(name, where, "not a valid IPv4 address") from None
    if len(name) > 253 or not _DNS_NAME.fullmatch(name):
        why = ("a host name may not start with '-'" if name.startswith("-") else
               "only letters, digits, '-', '_' and '.' may appear in a host name")
        raise _host_error(name, where, why)
    return name


def _check_ipv6(text: str, where: str) -> str:
    try:
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        raise _host_error(f"[{text}]", where, "not a valid IPv6 address") from None


def _split_item(item: str, where: str) -> tuple[str, str]:
    """``"a:2"`` -> ``("a", "2")``, ``"[::1]:2"`` -> ``("::1", "2")``, ``"a"`` -> ``("a", "")``."""
    if item.startswith("["):
        inside, sep, rest = item[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise _host_error(item, where, "an IPv6 address in brackets is written [ADDRESS] or [ADDRESS]:SLOTS")
        return _check_ipv6(inside, where), rest[1:] if rest else ""
    if item.count(":") > 1:
        try:
            ipaddress.IPv6Address(item.split("%")[0])
        except ValueError:
            raise _host_error(item, where, "more than one ':' (host:SLOTS has one)") from None
        raise _host_error(item, where, f"an IPv6 address needs brackets: [{item}] or [{item}]:SLOTS")
    name, _, slots = item.partition(":")
    return _check_name(name, where), slots


def _slots(text: str, where: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"shoal: slots must be a positive integer, got {text!r} in {where!r}. "
                         "HINT: write host:2 for two ranks on host.")
    return n


def parse_hosts(text: str) -> list[tuple[str, int]]:
    """``"a:2,b:2"`` -> ``[("a", 2), ("b", 2)]``; a host without ``:SLOTS`` has one slot.

    Hosts are DNS names, IPv4 addresses or IPv6 addresses in brackets (returned without them):
    ``"[::1]:2"`` -> ``[("::1", 2)]``.

    Raises:
        ValueError: a host that is none of those (``-oProxyCommand=x``, ``a b``, ``::1`` without
            brackets, ``a:2:3``), an empty or repeated host, or slots that are not a positive integer.

    Example:
        >>> parse_hosts("node1:2, 10.0.0.2, [fd00::3]:4")
        [('node1', 2), ('10.0.0.2', 1), ('fd00::3', 4)]
    """
    hosts: list[tuple[str, int]] = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        name, slots = _split_item(item, text)
        hosts.append((name, _slots(slots or "1", item)))
    return _check_hosts(hosts, text)


def parse_hostfile(path: str) -> list[tuple[str, int]]:
    """Read a host file: one ``host slots=N``, ``host:N`` or ``host`` per line; ``#`` comments.

    Hosts follow the grammar of :func:`parse_hosts`.

    Raises:
        ValueError: a line that does not parse (the message names the file and line).

    Example:
        >>> parse_hostfile("hosts.txt")   # "node1 slots=4" / "[fd00::2]:2" / "node3"
        [('node1', 4), ('fd00::2', 2), ('node3', 1)]
    """
    hosts: list[tuple[str, int]] = []
    with open(path) as fh:
        for lineno, raw in enumerate(fh, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            where = f"{path}:{lineno}"
            m = re.fullmatch(r"(\S+)\s+slots\s*=\s*(\S+)", line)
            if m:
                name, slots = _split_item(m.group(1), where)
                if slots:
                    raise _host_error(m.group(1), where, "give the slots once, as host slots=N or host:N")
                slots = m.group(2)
            elif re.fullmatch(r"\S+", line):
                name, slots = _split_item(line, where)
            else:
                raise ValueError(f"shoal: {where}: cannot parse {line!r}. HINT: write 'host slots=N' or "
                                 "'host:N'.")
            hosts.append((name, _slots(slots or "1", where)))
    return _check_hosts(hosts, path)


def parse_address(text: str, what: str = "--master-addr") -> str:
    """A single address (``--master-addr``): a DNS name, IPv4, or IPv6 with or without brackets.

    Returns the address without brackets (what sockets and TCPStore take).

    Raises:
        ValueError: anything else, naming ``what``.
    """
    inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if ":" in inner:
        return _check_ipv6(inner, what)
    return _check_name(inner, what)


def format_host(host: str) -> str:
    """A host as the user writes it: IPv6 addresses in brackets."""
    return f"[{host}]" if ":" in host else host


def _check_hosts(hosts: list[tuple[str, int]], where: str) -> list[tuple[str, int]]:
    names = [h for h, _ in hosts]
    if not hosts or any(not h for h in names):
        raise ValueError(f"shoal: no usable host in {where!r}. HINT: -H host1:2,host2:2")
    dup = sorted({h for h in names if names.count(h) > 1})
    if dup:
        raise ValueError(f"shoal: host(s) {', '.join(map(format_host, dup))} listed twice in {where!r}. "
                         "HINT: give each host once with its total slots, e.g. a:4.")
    return hosts


def place_ranks(hosts: Sequence[tuple[str, int]], num_proc: int) -> list[tuple[str, int]]:
    """Fill hosts in order: ``place_ranks([("a", 2), ("b", 2)], 3)`` -> ``[("a", 2), ("b", 1)]``.

    Hosts left with no rank are dropped; global ranks follow this order (host a holds ranks 0, 1).

    Raises:
        ValueError: ``num_proc`` exceeds the total number of slots.
    """
    total = sum(s for _, s in hosts)
    if num_proc > total:
        listed = ", ".join(f"{format_host(h)}:{s}" for h, s in hosts)
        raise ValueError(f"shoal: -np {num_proc} but the hosts have {total} slots ({listed}). "
                         "HINT: lower -np or add slots.")
    placed, left = [], num_proc
    for host, slots in hosts:
        take = min(slots, left)
        if take:
            placed.append((host, take))
        left -= take
    return placed


# ------------------------------------------------------------------------------- remote command


def _is_ssh(words: Sequence[str]) -> bool:
    return os.path.basename(words[0]) == "ssh"


def _fields(word: str) -> list[str]:
    """The format fields of ``word`` (``{host}`` -> ``["host"]``; ``{{x}}`` is a literal brace, no field)."""
    return [f for _, f, _, _ in string.Formatter().parse(word) if f is not None]


def check_remote_command(template: str) -> list[str]:
    """Split ``template`` into words and check that ``{host}`` is its one field (constraint 3).

    Returns:
        The template's words, ``{host}`` still in them.

    Raises:
        ValueError: unbalanced quotes, no ``{host}``, another field (``{0}``, ``{user}``), or, for ssh,
            an option after the host (ssh would read it as part of the remote command once ``--``
            ends its options).

    Example:
        >>> check_remote_command("ssh -p 2222 {host}")
        ['ssh', '-p', '2222', '{host}']
    """
    flag = f"--remote-command {template!r}"
    try:
        words = shlex.split(template)
    except ValueError as exc:
        raise ValueError(f"shoal: {flag}: {exc}. HINT: balance the quotes.") from None
    if not words:
        raise ValueError(f"shoal: {flag} is empty. HINT: e.g. {DEFAULT_REMOTE_COMMAND!r}.")
    host_words = []
    for i, word in enumerate(words):
        try:
            fields = _fields(word)
        except ValueError as exc:
            raise ValueError(f"shoal: {flag}: {exc}. HINT: write {{{{ and }}}} for a literal brace.") from None
        other = [f for f in fields if f != "host"]
        if other:
            raise ValueError(f"shoal: {flag}: only {{host}} is replaced, not {{{other[0]}}}. HINT: write "
                             "{{ and }} for a literal brace.")
        if fields:
            host_words.append(i)
    if not host_words:
        raise ValueError(f"shoal: {flag} has no {{host}}. HINT: e.g. {DEFAULT_REMOTE_COMMAND!r}.")
    if _is_ssh(words) and any(w.startswith("-") for w in words[host_words[-1] + 1:]):
        raise ValueError(f"shoal: {flag}: put ssh's options before {{host}} (shoal ends ssh's options with "
                         "'--' before the host). HINT: e.g. 'ssh -p 2222 {host}'.")
    return words


def remote_argv(template: str, host: str, command: Sequence[str]) -> list[str]:
    """The argv that runs ``command`` on ``host`` through ``template`` (constraints 2 and 3).

    For an ssh template, ``--`` goes before the word holding the host and every word of ``command`` is
    quoted for the remote shell (ssh joins its arguments into one line for it). Other templates
    (``ip netns exec {host}``, ``docker exec {host}``) exec their arguments without a shell: ``command``
    follows as separate words, unquoted.

    Raises:
        ValueError: ``template`` is not a valid template (see :func:`check_remote_command`), or
            ``host`` is not a valid host.

    Example:
        >>> remote_argv("ssh -o BatchMode=yes {host}", "node2", ["/opt/my env/bin/python", "-m", "x"])
        ['ssh', '-o', 'BatchMode=yes', '--', 'node2', "'/opt/my env/bin/python'", '-m', 'x']
    """
    words = check_remote_command(template)
    host = parse_address(host, "host")
    ssh = _is_ssh(words)
    out: list[str] = []
    # The destination is the last word holding {host} (an earlier one may be an option's value, e.g.
    # ProxyJump={host}-gw); check_remote_command made sure that no option follows it.
    destination = max(i for i, w in enumerate(words) if _fields(w))
    for i, word in enumerate(words):
        if ssh and i == destination and "--" not in out:
            out.append("--")
        out.append(word.format(host=host))
    return out + ([shlex.quote(w) for w in command] if ssh else list(command))
