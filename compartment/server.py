"""compartment serve: the resident supervisor, qmail-lspawn's place.

Privileged (root), long-running, single-threaded: one poll() loop over the listening socket, every
client connection, the spawner's channel and every live compartment's Watch — no thread per
delivery.  Per connection (docs/protocol.md): the peer is who SO_PEERCRED says; its rule in the
server configuration is found before anything is read; one request is read (bounded, with a
deadline) and decoded by compartment.protocol, the only reader of what a peer sent; the policy
and overrides are authorized (compartment.authorize); the run is prepared as `compartment run`
prepares it (supervisor.prepare) and cloned by the spawner, or committed to a compartment
prepared ahead for its policy (compartment.ahead); watched, classified by the same code
(api._classify, api.stderr_text) and answered as soon as the compartment is empty — its
teardown, the init's reaping and the uid's release come after; one log line per delivery, in
the mail facility.

A client that disconnects mid-delivery has its compartment killed and reaped.  SIGTERM stops
accepting, refuses what was not yet started and finishes what was; SIGHUP reloads the
configuration (and forgets cached policies).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import replace

from compartment import authorize, cgroups, listening, message, protocol, serveconfig, watch
from compartment.ahead import Ahead, Spare
from compartment.api import _classify, agent_convention, failure, stderr_text
from compartment.authorize import Refused
from compartment.confine import commit
from compartment.connection import (
    Connection,
    Delivery,
    check_outputs,
    encode,
    failed,
    peer,
    receive,
)
from compartment.exits import Convention, Outcome
from compartment.policy import Policy
from compartment.report import Result, append
from compartment.serverlog import Log, Stats
from compartment.spawner import Spawner
from compartment.supervisor import ConfigError, NotShown, Prepared, commit_request, prepare

DEFAULT_SOCKET = "/run/compartment/socket"
REQUEST_TIMEOUT_S = 10.0  # to send the request once connected: a silent client is dropped
# A delivery still running after this long tells its client how long it may take (ACCEPTED);
# most end sooner, and their client is woken once, for the result.  Well under the client's
# own first wait (client.START_WAIT_S).
ACCEPTED_AFTER_S = 10.0
MAX_CONNECTIONS = 1024


class Server:
    def __init__(self, config_path: str, socket_path: str, log: Log,
                 request_timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.config_path, self.socket_path, self.log = config_path, socket_path, log
        self.request_timeout_s = request_timeout_s
        self.config = serveconfig.load(config_path)
        self.stats = Stats(config_path)
        self.connections: dict[int, Connection] = {}
        self.spawning: list[Connection | Spare] = []  # in the order the spawner answers
        # Inits of answered deliveries, exiting (pidfd -> pid, what the compartment holds: its
        # cgroup, its uid's lease): reaped, and both released, after the client has its answer.
        self.reaping: dict[int, tuple[int, Prepared]] = {}
        self.stopping = self.reload = False
        self.poller = select.poll()
        self.registered: dict[int, int] = {}
        self.activated = listening.activated()  # systemd's socket: its unit sets the mode
        self.listener = listening.listener(socket_path, self.config, self.activated)
        # On cgroup v2 the daemon moves into its delegated cgroup's leaf before the spawner
        # starts, which would otherwise stay in the cgroup to divide (cgroup_hierarchies.py);
        # none usable (or no right to make one) is each run's configuration error, said then.
        with contextlib.suppress(cgroups.Unavailable, OSError):
            cgroups.layout()
        self.spawner = Spawner()
        self.ahead = Ahead(lambda: self.spawner, self.log.info)
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def run(self) -> int:
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        listening.notify(f"READY=1\nSTATUS=serving on {self.socket_path}")
        self.log.info(f"serving on {self.socket_path}, {self.config.source}")
        while not (self.stopping and not self.connections and not self.reaping
                   and not self.ahead.waiting()):
            handlers = self._handlers()
            watch.sync(self.poller, self.registered, {fd: ev for fd, (ev, _) in handlers.items()})
            for fd, events in self.poller.poll(self._timeout_ms()):
                if fd in handlers:
                    handlers[fd][1](events)
            self._expire()
            if self.reload:
                self._reload()
            if self.stopping and self.ahead.ready:
                self.ahead.drop_all()
        self.spawner.stop()
        cgroups.release()  # the cgroups made ahead, and those of finished compartments
        listening.notify("STOPPING=1")
        self.log.info("stopped")
        return 0

    # The loop's bookkeeping.

    def _handlers(self) -> dict[int, tuple[int, Callable[[int], None]]]:
        out: dict[int, tuple[int, Callable[[int], None]]] = {
            self.wake_r: (select.POLLIN, self._on_wake),
            self.spawner.channel.fileno(): (select.POLLIN, self._on_spawner)}
        if not self.stopping:
            out[self.listener.fileno()] = (select.POLLIN, self._on_accept)
        for pidfd in self.reaping:
            out[pidfd] = (select.POLLIN, lambda ev, p=pidfd: self._on_reaped(p))
        out.update((fd, (select.POLLIN, handler)) for fd, handler in self.ahead.handlers().items())
        for fd, conn in self.connections.items():
            delivery = conn.delivery
            if conn.lingering:
                out[fd] = (select.POLLIN, lambda ev, c=conn: self._on_linger(c))
                continue
            if delivery is None:
                out[fd] = (select.POLLIN, lambda ev, c=conn: self._guarded(c, self._on_request, c))
                continue
            if not conn.gone:  # after a second request, only its hanging up
                interest = select.POLLRDHUP | (0 if conn.violated else select.POLLIN)
                out[fd] = (interest, lambda ev, c=conn: self._guarded(c, self._on_hangup, c, ev))
            if delivery.spool is not None:
                out[delivery.fds[0]] = (select.POLLIN,
                                        lambda ev, c=conn: self._guarded(c, self._on_spool, c))
            if delivery.running:
                for wfd, events in delivery.watch.wanted().items():
                    out[wfd] = (events, lambda ev, c=conn, f=wfd: self._guarded(
                        c, self._on_watch, c, f, ev))
        return out

    def _timeout_ms(self) -> int | None:
        now, waits = time.monotonic(), []
        for conn in self.connections.values():
            if conn.delivery is None or conn.delivery.spool is not None:
                waits.append(max(0, int((conn.deadline - now) * 1000) + 1))
            elif conn.delivery.running:
                ms = conn.delivery.watch.poll_ms()
                if ms is not None:
                    waits.append(ms)
                if not conn.delivery.accepted:
                    accept_at = conn.delivery.watch.started + ACCEPTED_AFTER_S
                    waits.append(max(0, int((accept_at - now) * 1000) + 1))
        return min(waits, default=None)

    def _expire(self) -> None:
        now = time.monotonic()
        for conn in list(self.connections.values()):
            if conn.lingering and now >= conn.deadline:
                self._close(conn)
            elif conn.delivery is None and now >= conn.deadline:
                self._refuse(conn, f"no request within {self.request_timeout_s:g} s")
            elif conn.delivery is not None and conn.delivery.spool is not None and \
                    now >= conn.deadline:
                delivery = conn.delivery
                self._end(conn, failure(Outcome.TIMEOUT, "timed out after "
                                        f"{delivery.policy.limits.wall_timeout_s:g} s, the "
                                        "message still arriving", delivery.policy.name,
                                        delivery.request.argv, delivery.caller,
                                        delivery.started))
            elif conn.delivery is not None and conn.delivery.running:
                conn.delivery.watch.check_deadline()
                self._maybe_finish(conn)
                self._maybe_accept(conn, now)

    def _on_reaped(self, pidfd: int) -> None:
        pid, held = self.reaping.pop(pidfd)
        os.waitpid(pid, 0)  # readable pidfd: it has exited
        os.close(pidfd)
        held.release()

    def _on_wake(self, _events: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self.wake_r, 512)

    def _on_stop(self, _signum: int, _frame: object) -> None:
        self.stopping = True  # the loop drops what was prepared ahead (not in a handler)

    def _on_reload(self, _signum: int, _frame: object) -> None:
        self.reload = True

    def _reload(self) -> None:
        self.reload = False
        try:
            self.config = serveconfig.load(self.config_path)
        except (serveconfig.ConfigError, OSError) as err:
            self.log.error(f"reload refused, the old configuration stays: {err}")
            return
        authorize.forget_policies()
        self.ahead.drop_all()  # prepared for policies that may have changed
        if not self.activated:
            listening.set_mode(self.socket_path, self.config)
        self.log.info(f"reloaded {self.config.source}")

    # Connections and requests.

    def _on_accept(self, _events: int) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return
        except OSError as err:  # EMFILE and the like: the client sees EOF and defers
            self.log.error(f"accept: {err.strerror}")
            return
        sock.setblocking(False)
        who = peer(sock)
        rule = self.config.rule_for(who.uid, who.groups)
        conn = Connection(sock, who, rule, self.request_timeout_s)
        self.connections[sock.fileno()] = conn
        if len(self.connections) > MAX_CONNECTIONS:
            self._refuse(conn, f"too many connections ({MAX_CONNECTIONS})")
        elif rule is None:
            self._refuse(conn, f"{who} may not use the daemon (no rule in {self.config.source})")
        elif self.stopping:
            self._refuse(conn, "the daemon is stopping")

    def _on_request(self, conn: Connection) -> None:
        try:
            data, fds, refusal = receive(conn.sock)
        except OSError as err:
            self._close(conn)
            if err.errno not in (errno.ECONNRESET, errno.EAGAIN):
                self.log.error(f"{conn.peer}: receive: {err.strerror}")
            return
        if refusal is None and not data and not fds:
            self._close(conn)  # connected and left without a word
            return
        try:
            if refusal:
                raise Refused(refusal)
            request = protocol.decode_request(data, len(fds))
            if self.stopping:
                raise Refused("the daemon is stopping")
            if request.kind == protocol.STATUS:
                self._status(conn)
                return
        except (Refused, protocol.ProtocolError) as err:
            for fd in fds:
                os.close(fd)
            self._refuse(conn, str(err))
            return
        try:
            policy = self._authorize(conn, request, fds)
        except Refused as err:
            for fd in fds:
                os.close(fd)
            self._refuse(conn, str(err), request)
            return
        self._start(conn, request, policy, fds)

    def _status(self, conn: Connection) -> None:
        if conn.rule is None or not conn.rule.status:
            raise Refused(f"{conn.peer} may not ask for the status ({self.config.source})")
        self._send(conn, protocol.encode_status(self.stats.text()))
        self._close(conn)

    def _authorize(self, conn: Connection, request: protocol.Request,
                   fds: list[int]) -> Policy:
        rule = conn.rule
        assert rule is not None  # a peer without one was refused on connecting
        live = sum(1 for c in self.connections.values()
                   if c.delivery is not None and c.peer.uid == conn.peer.uid)
        if live >= rule.max_live:
            raise Refused(f"{conn.peer} has {live} compartments running, its limit "
                          f"({rule.where}: max_live)")
        policy = authorize.policy_for(conn.peer, rule, request.policy, request.sets)
        if request.fds[3:] != tuple(policy.descriptors.pass_):
            raise Refused(f"descriptors {list(request.fds)}: policy {policy.name} takes 0, 1, "
                          f"2 and {list(policy.descriptors.pass_) or 'no other'}")
        check_outputs(fds)
        return policy

    def _start(self, conn: Connection, request: protocol.Request, policy: Policy,
               fds: list[int]) -> None:
        """The delivery owns the descriptors from here on, whatever happens.  A policy that
        wants a copy of the message (message.stdin) has it made first, without blocking."""
        qmail = request.flags & protocol.CALLER_QMAIL
        caller = Convention.QMAIL if qmail else Convention.SYSEXITS
        named = None if not request.flags & protocol.AGENT_GIVEN else \
            "qmail" if request.flags & protocol.AGENT_QMAIL else "sysexits"
        delivery = Delivery(request, policy, fds, caller, agent_convention(policy, caller, named))
        conn.delivery = delivery
        conn.deadline = delivery.started + policy.limits.wall_timeout_s  # for the copy
        if policy.message.stdin == "direct":
            self._launch(conn)
            return
        try:
            mode = os.fstat(fds[0]).st_mode
            if not (stat.S_ISFIFO(mode) or stat.S_ISREG(mode)):
                raise message.MessageError(f"message.stdin = \"{policy.message.stdin}\": the "
                                           "daemon copies a message from a pipe or a file only")
            delivery.spool = message.Spool(fds[0], policy.message.stdin,
                                           policy.message.max_bytes)
        except (message.MessageError, OSError) as err:
            self._end(conn, failure(Outcome.CONFIG_ERROR, str(err), policy.name, request.argv,
                                    caller, delivery.started))

    def _on_spool(self, conn: Connection) -> None:
        """Some more of the message into the copy; once it is all in, the run starts."""
        delivery = conn.delivery
        assert delivery is not None and delivery.spool is not None
        if delivery.ended:
            return
        try:
            if not delivery.spool.step():
                return
            delivery.stdin = delivery.spool.finish()
        except message.MessageError as err:
            self._end(conn, failure(Outcome.CONFIG_ERROR, str(err), delivery.policy.name,
                                    delivery.request.argv, delivery.caller, delivery.started))
            return
        delivery.fds.append(delivery.stdin)  # closed with the others at the end
        delivery.spool = None
        self._launch(conn)

    def _launch(self, conn: Connection) -> None:
        """Prepare the run as `compartment run` does, and clone it — or commit a compartment
        prepared ahead for its policy (compartment.ahead)."""
        delivery = conn.delivery
        assert delivery is not None and conn.rule is not None
        request, policy, fds = delivery.request, delivery.policy, delivery.fds
        ahead = self.ahead.eligible(policy, request.sets, conn.peer.uid == 0)
        try:
            if delivery.stdin < 0:  # direct: read-only, opened again (if need be) as the peer
                with authorize.as_peer(conn.peer):
                    delivery.stdin = delivery.stack.enter_context(
                        message.read_only((fds[0], fds[1], fds[2]), policy.message.max_bytes))
            std = (delivery.stdin, fds[1], fds[2])
            opener = authorize.opener(conn.peer, conn.rule, request.sets)
            spare = self.ahead.take(policy) if ahead else None
            committed = spare is not None and self._commit(conn, spare, std, opener)
            if not committed:
                self._clone(conn, std, opener)
            self.stats.launched(committed)
        except (ConfigError, message.MessageError, Refused) as err:
            why = f"refused: {err}" if isinstance(err, Refused) else str(err)
            if isinstance(err, Refused):
                self.log.refusal(conn.peer, str(err))
            self._end(conn, failure(Outcome.CONFIG_ERROR, why, policy.name, request.argv,
                                    delivery.caller, delivery.started))
            return
        except Exception as err:  # noqa: BLE001 - this delivery's failure, not the daemon's
            self._end(conn, failed(delivery, f"{type(err).__name__}: {err}"))
            return
        self.stats.begin(policy.name, conn.peer.uid)
        delivery.counted = True
        if ahead:  # the next one of this policy, while this one runs
            spare = self.ahead.want(policy)
            if spare is not None:
                self.spawning.append(spare)

    def _clone(self, conn: Connection, std: tuple[int, int, int],
               opener: authorize.supervisor.Opener | None) -> None:
        """The ordinary way: prepared for this request, cloned by the spawner."""
        delivery = conn.delivery
        assert delivery is not None
        request, policy = delivery.request, delivery.policy
        delivery.prepared = prepared = prepare(request.argv, policy, std, request.env, opener)
        delivery.watch = watch.Watch(policy.limits, std, prepared.compiled.names,
                                     cgroup=prepared.cgroup)
        ours, theirs = socket.socketpair(socket.AF_UNIX,
                                         socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        delivery.status = ours
        try:
            self.spawner.send(replace(prepared.plan, handed=self._handed(delivery, std)),
                              theirs.fileno())
        finally:
            theirs.close()
            prepared.close_paths()  # the spawner has its copies, or there is no child
        self.spawning.append(conn)

    def _commit(self, conn: Connection, spare: Spare, std: tuple[int, int, int],
                opener: authorize.supervisor.Opener | None) -> bool:
        """Give a prepared compartment this request's part; False (and the compartment back
        to the pool) when its root does not show the program."""
        delivery = conn.delivery
        assert delivery is not None
        request, policy = delivery.request, delivery.policy
        try:
            prepared = commit_request(spare.prepared, request.argv, policy, std, request.env,
                                      opener)
        except NotShown:
            self.ahead.give_back(spare)
            return False
        except BaseException:
            self.ahead.give_back(spare)
            raise
        delivery.prepared, delivery.status = prepared, spare.status
        delivery.watch = watch_ = watch.Watch(policy.limits, std, prepared.compiled.names,
                                              cgroup=prepared.cgroup)
        plan = prepared.plan
        commit.send(spare.status, plan.program, plan.argv, plan.env, self._handed(delivery, std))
        os.close(spare.pidfd)  # the watch opens its own
        watch_.start(spare.pid, spare.status)
        delivery.running = True
        return True

    @staticmethod
    def _handed(delivery: Delivery, std: tuple[int, int, int]) -> tuple[tuple[int, int], ...]:
        """The agent's descriptors: stdin, the watch's pipes, the policy's extra ones."""
        assert delivery.watch is not None
        request, fds = delivery.request, delivery.fds
        passed = zip(request.fds[3:], fds[3:len(request.fds)], strict=True)
        return ((0, std[0]), *delivery.watch.agent_ends(), *passed)

    def _on_spawner(self, events: int) -> None:
        try:
            pid, err = self.spawner.answer()
        except OSError as error:
            self.log.error(f"the spawner is gone ({error.strerror}): starting a new one")
            self._restart_spawner()
            return
        item = self.spawning.pop(0)
        if isinstance(item, Spare):
            self.ahead.spawned(item, pid, err)
            return
        conn, delivery = item, item.delivery
        assert delivery is not None and delivery.status is not None
        if not pid:
            self._end(conn, failed(delivery, f"cannot clone: {os.strerror(err)}"))
            return
        delivery.watch.start(pid, delivery.status)
        delivery.running = True
        if delivery.stopped:
            delivery.watch.caller_error = delivery.stopped
            delivery.watch.kill(Outcome.INTERNAL_ERROR)

    def _maybe_accept(self, conn: Connection, now: float) -> None:
        delivery = conn.delivery
        assert delivery is not None and delivery.watch is not None
        if delivery.ended or delivery.accepted or conn.gone or \
                now < delivery.watch.started + ACCEPTED_AFTER_S:
            return
        delivery.accepted = True
        self._send(conn, protocol.encode_accepted(delivery.watch.limits.wall_timeout_s))

    def _restart_spawner(self) -> None:
        for item in self.spawning:
            if isinstance(item, Spare):
                self.ahead.spawned(item, 0, errno.EPIPE)
            else:
                assert item.delivery is not None
                self._end(item, failed(item.delivery, "the spawner died"))
        self.spawning.clear()
        self.spawner.channel.close()
        self.spawner.process.wait()
        self.spawner = Spawner()

    def _on_hangup(self, conn: Connection, events: int) -> None:
        """Anything on a connection mid-delivery: the client left (its compartment is killed
        and reaped, unanswered), or sent a second request (refused: the first is stopped, and
        answered with that reason)."""
        delivery = conn.delivery
        assert delivery is not None
        if delivery.ended:
            return
        if events & (select.POLLHUP | select.POLLRDHUP | select.POLLERR):
            conn.gone, why = True, "the client disconnected"
        else:
            with contextlib.suppress(OSError):  # what it sent is dropped, whatever it was
                _, fds, _ = receive(conn.sock)
                for fd in fds:
                    os.close(fd)
            conn.violated, why = True, "a second request on one connection: refused"
            self.log.refusal(conn.peer, why)
        delivery.stopped = why
        if delivery.running:
            delivery.watch.caller_error = why
            delivery.watch.kill(Outcome.INTERNAL_ERROR)
        elif delivery.spool is not None:  # nothing runs yet: over now
            self._end(conn, failed(delivery, why))

    def _on_watch(self, conn: Connection, fd: int, events: int) -> None:
        delivery = conn.delivery
        assert delivery is not None and delivery.watch is not None
        if delivery.ended:
            return  # an event of the same poll() round, for a descriptor closed since
        delivery.watch.on_event(fd, events)
        self._maybe_finish(conn)

    def _maybe_finish(self, conn: Connection) -> None:
        delivery = conn.delivery
        if delivery is None or not delivery.running or not delivery.watch.finished:
            return
        watch_ = delivery.watch
        if not watch_.reaped:  # the compartment is empty, its init exiting: reaped later
            pid, pidfd = watch_.release_init()
            # the cgroup goes and the uid is free once its init is reaped
            self.reaping[pidfd] = (pid, replace(delivery.prepared))
            delivery.prepared.lease = delivery.prepared.cgroup = None
        watch_.close()
        try:
            result = _classify(delivery.watch, delivery.prepared, delivery.policy,
                               delivery.request.argv, delivery.caller, delivery.agent)
        except Exception as err:  # noqa: BLE001 - a bug here must not take the daemon down
            result = failed(delivery, f"{type(err).__name__}: {err}")
        self._end(conn, result, bytes(delivery.watch.diagnostics))

    def _end(self, conn: Connection, result: Result, diagnostics: bytes = b"") -> None:
        """The delivery is over: release what it held, answer, log, count.  Once."""
        delivery = conn.delivery
        assert delivery is not None
        if delivery.ended:
            return
        delivery.ended = True
        delivery.close()
        policy = delivery.policy
        self.stats.end(policy.name, conn.peer.uid, result, time.monotonic() - delivery.started,
                       began=delivery.counted)
        if not conn.gone:
            self._answer(conn, result, diagnostics, delivery.caller, policy.report.path,
                         delivery.request.report)
        else:
            self.log.delivery(conn.peer, result, "the client had disconnected")
            self._close(conn)

    def _guarded(self, conn: Connection, handler: Callable[..., None], *args: object) -> None:
        """One connection's handler; a bug in it ends that delivery, never the daemon."""
        try:
            handler(*args)
        except Exception as err:  # noqa: BLE001 - the daemon's catch-all, per connection
            why = f"{type(err).__name__}: {err}"
            self.log.error(f"{conn.peer}: internal error: {why}")
            if conn.delivery is None:
                self._refuse(conn, f"internal error: {why}")
            elif conn in self.spawning:
                conn.gone = True  # the spawner's answer ends it
            else:
                self._end(conn, failed(conn.delivery, why))

    def _answer(self, conn: Connection, result: Result, diagnostics: bytes, caller: Convention,
                policy_report: str, peer_report: str) -> None:
        problem = append(policy_report, result) if policy_report else None
        if peer_report:  # the peer's file, written with the peer's own rights
            with authorize.as_peer(conn.peer):
                problem = append(peer_report, result) or problem
        self._send(conn, encode(result, stderr_text(result, diagnostics, caller, problem)))
        self.log.delivery(conn.peer, result)
        self._close(conn)

    def _refuse(self, conn: Connection, reason: str,
                request: protocol.Request | None = None) -> None:
        """Answer a request that will not run: a temporary failure with the reason.  The
        client puts the reason line in its caller's convention.  A request that could be read
        has its report line too, written as the peer, as `run` reports a policy error."""
        self.log.refusal(conn.peer, reason)
        caller = Convention.QMAIL if request and request.flags & protocol.CALLER_QMAIL else \
            Convention.SYSEXITS
        result = failure(Outcome.CONFIG_ERROR, f"refused: {reason}",
                         request.policy if request else "", request.argv if request else (),
                         caller)
        if request and request.report:
            with authorize.as_peer(conn.peer):
                append(request.report, result)  # a failure here has nowhere to be told
        self.stats.end("", conn.peer.uid, result, 0.0, began=False)
        self._send(conn, encode(result, b"", refused=True))
        conn.lingering = True
        conn.deadline = time.monotonic() + self.request_timeout_s

    def _on_linger(self, conn: Connection) -> None:
        """Read and drop whatever a refused client still sends, until it closes."""
        try:
            data, fds, _ = receive(conn.sock)
        except OSError:
            data, fds = b"", []
        for fd in fds:
            os.close(fd)
        if not data and not fds:
            self._close(conn)

    def _send(self, conn: Connection, data: bytes) -> None:
        try:
            conn.sock.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except OSError as err:  # the client is gone or does not read: it will defer
            conn.gone = True
            if err.errno not in (errno.EPIPE, errno.ECONNRESET):
                self.log.error(f"{conn.peer}: send: {err.strerror}")

    def _close(self, conn: Connection) -> None:
        self.connections.pop(conn.sock.fileno(), None)
        conn.sock.close()
