"""The handshake: fixed newstyle negotiation and option haggling, up to the moment a
client chooses an export (``NBD_OPT_GO`` or ``NBD_OPT_EXPORT_NAME``).

Supported options: EXPORT_NAME, ABORT, LIST, INFO, GO, STRUCTURED_REPLY,
LIST_META_CONTEXT and SET_META_CONTEXT (one context, ``base:allocation``).  STARTTLS
is refused by policy (no TLS: serve on a Unix socket or a trusted network); every
other option is answered ``NBD_REP_ERR_UNSUP``.  A client that breaks the framing (bad
magic, an option longer than 64 KiB, unknown client flags) is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import protocol as P

META_CONTEXT_ID = 1                  # the id of base:allocation on every connection


@dataclass
class Session:
    """What a negotiation settled: the export and the features of this connection."""
    export: object
    structured: bool = False
    base_allocation: bool = False    # base:allocation selected (block status allowed)


class _Haggle:
    """The state of one connection's option haggling."""

    def __init__(self, ch: P.Channel, server):
        self.ch = ch
        self.server = server
        self.structured = False
        self.meta_export: str | None = None    # export the meta context was set for
        self.meta_selected = False

    # -- replies ------------------------------------------------------------------
    def reply(self, opt: int, kind: int, data: bytes = b"") -> None:
        self.ch.send(P.option_reply(opt, kind, data))

    def error(self, opt: int, kind: int, message: str) -> None:
        self.reply(opt, kind, message.encode()[:P.MAX_STRING])

    # -- the loop -------------------------------------------------------------------
    def run(self, no_zeroes: bool) -> Session | None:
        while True:
            magic, opt, length = P.OPTION.unpack(self.ch.recv_exact(P.OPTION.size))
            if magic != P.IHAVEOPT:
                raise P.ProtocolError(f"bad option magic {magic:#x}")
            if length > P.MAX_OPTION:
                raise P.ProtocolError(f"option {P.OPTION_NAMES.get(opt, opt)} of {length} bytes "
                                      f"(limit {P.MAX_OPTION})")
            data = self.ch.recv_exact(length) if length else b""
            if opt == P.OPT_EXPORT_NAME:
                return self.export_name(data, no_zeroes)
            if opt == P.OPT_ABORT:
                self.reply(opt, P.REP_ACK)
                return None
            done = self.option(opt, data)
            if done is not None:
                return done

    def option(self, opt: int, data: bytes) -> Session | None:
        if opt == P.OPT_LIST:
            if data:
                self.error(opt, P.REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                return None
            for exp in self.server.list_exports():
                name = exp.name.encode()
                self.reply(opt, P.REP_SERVER, P.U32.pack(len(name)) + name
                           + exp.description.encode())
            self.reply(opt, P.REP_ACK)
        elif opt in (P.OPT_INFO, P.OPT_GO):
            return self.info(opt, data)
        elif opt == P.OPT_STRUCTURED_REPLY:
            if data:
                self.error(opt, P.REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
                return None
            self.structured = True
            self.reply(opt, P.REP_ACK)
        elif opt in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
            self.meta_context(opt, data)
        elif opt == P.OPT_STARTTLS:
            self.error(opt, P.REP_ERR_POLICY, "TLS is not supported by this server")
        else:
            self.error(opt, P.REP_ERR_UNSUP, f"option {opt} is not supported")
        return None

    # -- choosing an export ------------------------------------------------------------
    def export_name(self, data: bytes, no_zeroes: bool) -> Session | None:
        """NBD_OPT_EXPORT_NAME: no error reply exists; an unknown name drops the client."""
        name = _decode(data)
        exp = self.server.lookup(name) if name is not None else None
        if exp is None:
            raise P.ProtocolError(f"unknown export {data[:64]!r} (NBD_OPT_EXPORT_NAME)")
        reply = P.EXPORT_NAME_REPLY.pack(exp.size, exp.transmission_flags(self.structured))
        self.ch.send(reply if no_zeroes else reply + bytes(124))
        return self.session(exp)

    def info(self, opt: int, data: bytes) -> Session | None:
        """NBD_OPT_INFO / NBD_OPT_GO: name length, name, count of info requests, requests."""
        if len(data) < 6:
            self.error(opt, P.REP_ERR_INVALID, "option data too short")
            return None
        n = P.U32.unpack_from(data)[0]
        if 4 + n + 2 > len(data):
            self.error(opt, P.REP_ERR_INVALID, "export name overruns the option")
            return None
        name = _decode(data[4:4 + n])
        count = P.U16.unpack_from(data, 4 + n)[0]
        if len(data) != 4 + n + 2 + 2 * count:
            self.error(opt, P.REP_ERR_INVALID, "information requests do not match the length")
            return None
        wanted = {P.U16.unpack_from(data, 6 + n + 2 * i)[0] for i in range(count)}
        exp = self.server.lookup(name) if name is not None else None
        if exp is None:
            self.error(opt, P.REP_ERR_UNKNOWN, f"export {name!r} not found")
            return None
        flags = exp.transmission_flags(self.structured)
        self.reply(opt, P.REP_INFO, P.info_export(exp.size, flags))
        if P.INFO_NAME in wanted:
            self.reply(opt, P.REP_INFO, P.info_string(P.INFO_NAME, exp.name))
        if P.INFO_DESCRIPTION in wanted and exp.description:
            self.reply(opt, P.REP_INFO, P.info_string(P.INFO_DESCRIPTION, exp.description))
        # minimum 1 (any alignment), preferred 4 KiB, maximum the request cap
        self.reply(opt, P.REP_INFO, P.info_block_size(1, 4096, P.MAX_REQUEST))
        self.reply(opt, P.REP_ACK)
        if opt == P.OPT_GO:
            return self.session(exp)
        return None

    def session(self, exp) -> Session:
        selected = self.meta_selected and self.meta_export == exp.name
        return Session(exp, structured=self.structured, base_allocation=selected)

    # -- metadata contexts ----------------------------------------------------------------
    def meta_context(self, opt: int, data: bytes) -> None:
        """LIST_/SET_META_CONTEXT: export name, then a counted list of queries."""
        if not self.structured:
            self.error(opt, P.REP_ERR_INVALID, "structured replies must be negotiated first")
            return
        parsed = _parse_meta(data)
        if parsed is None:
            self.error(opt, P.REP_ERR_INVALID, "malformed metadata context request")
            return
        name, queries = parsed
        exp = self.server.lookup(name)
        if exp is None:
            self.error(opt, P.REP_ERR_UNKNOWN, f"export {name!r} not found")
            return
        if opt == P.OPT_LIST_META_CONTEXT:
            match = not queries or any(_matches(q) for q in queries)
        else:
            match = any(q == P.BASE_ALLOCATION for q in queries)
            self.meta_export = exp.name
            self.meta_selected = match
        if match:
            ctx = P.BASE_ALLOCATION.encode()
            self.reply(opt, P.REP_META_CONTEXT, P.U32.pack(
                META_CONTEXT_ID if opt == P.OPT_SET_META_CONTEXT else 0) + ctx)
        self.reply(opt, P.REP_ACK)


def _decode(raw: bytes) -> str | None:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return None


def _matches(query: str) -> bool:
    """LIST queries: "base:" lists every base context, "base:allocation" itself."""
    return query in ("base:", P.BASE_ALLOCATION)


def _parse_meta(data: bytes):
    if len(data) < 8:
        return None
    n = P.U32.unpack_from(data)[0]
    if 4 + n + 4 > len(data):
        return None
    name = _decode(data[4:4 + n])
    pos = 4 + n
    count = P.U32.unpack_from(data, pos)[0]
    pos += 4
    queries = []
    for _ in range(count):
        if pos + 4 > len(data):
            return None
        k = P.U32.unpack_from(data, pos)[0]
        pos += 4
        if pos + k > len(data):
            return None
        q = _decode(data[pos:pos + k])
        if q is None:
            return None
        queries.append(q)
        pos += k
    if pos != len(data) or name is None:
        return None
    return name, queries


def negotiate(ch: P.Channel, server) -> Session | None:
    """Run the handshake on a fresh connection: the chosen export's session, or None
    when the client aborted.  Raises ``ProtocolError`` / ``Disconnected``."""
    ch.send(P.HELLO.pack(P.NBDMAGIC, P.IHAVEOPT, P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES))
    flags = P.CLIENT_FLAGS.unpack(ch.recv_exact(4))[0]
    if flags & ~(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES):
        raise P.ProtocolError(f"unknown client flags {flags:#x}")
    return _Haggle(ch, server).run(bool(flags & P.FLAG_C_NO_ZEROES))
