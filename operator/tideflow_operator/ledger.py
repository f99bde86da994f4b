"""What each site was sent to run, kept in Kubernetes so a restarted operator knows it.

Why: a Workflow deleted while the operator is down (or while a standby takes
over) is gone from the API server, and with it the only trace that a site is
running it.  Nothing on the Workflow itself holds it back (no finalizer since
decision 0019), so before an assignment is published the operator records it
here, one data key per run uid in a few ConfigMaps of the operator's own
namespace.  At start-up and periodically the operator compares these entries
with the Workflows that exist and sends a cancel for each run whose Workflow is
gone.

Each entry also carries the digest of the spec that was assigned (``suspend``
left out): after a restart the assignment is re-sent only if the Workflow's
spec still has that digest, so an edit that was refused is never sent.  When
an edit is refused while the site has not yet confirmed the assignment, the
assignment itself is kept too (gzip and base64, under ``<uid>.assigned``), so
a restarted operator can re-send exactly that.

Where the entries live (decision 0019): ``BUCKETS`` ConfigMaps shared by all
sites (``tideflow-ledger.<n>``, a site's entries always in the same one, chosen
by a stable hash of its name), not one per site: a burst spread over a fleet's
sites shared no write when each site had its own.  Writes are group commits:
every change that arrives while a ConfigMap's write is in flight, or within
``COMMIT_SPACING_SECONDS`` of its last one, shares its next merge patch, so a
burst of admissions costs at most ``BUCKETS / COMMIT_SPACING_SECONDS`` writes a
second whatever its size, and a lone admission is written at once.  Removals
(runs that finished, cancels that were delivered) are lazy: they ride along
with the next write, or housekeeping writes them at most every
``REMOVAL_SECONDS``; an entry removed late costs at most one spare cancel of a
finished run.  A ConfigMap holds about 1 MiB, some 7,000 live entries: about
``BUCKETS`` x 7,000 unfinished runs in all (a single site's runs share one).
Kept assignments take at most :data:`KEPT_BYTES` of a ConfigMap in all: a spec
of up to 960 KiB that does not compress (an embedded file) packs as large, two
of them made a ConfigMap the API server refuses, and the refused values rode
along with every later write of it, so no site sharing it could be assigned
anything.  One past the budget is not kept (:class:`LedgerFull`, logged): a
restart before its site confirms it then sends nothing and says so on the
Workflow, as for an edit made while no operator ran.
The per-site ConfigMaps of older operators (``tideflow-ledger-<site>``) are
still read, and their entries removed from there.

Invariants:

* an entry is written (and the write has returned) before the assignment it
  describes is published;
* an entry leaves only when its run is finished and that status is stored, or
  when the cancel for its deleted Workflow was handed to a connected link.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import logging
import re
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from tideflow import wire
from tideflow.spec import site_spec

log = logging.getLogger(__name__)
_RUN_UID = re.compile(wire.UID_PATTERN)  # what an assignment's (and a cancel's) uid may be

CONFIGMAP_PREFIX = "tideflow-ledger-"  # + site: an older operator's per-site ConfigMap
BUCKET_PREFIX = "tideflow-ledger."  # + n (site names have no dot: never one of the above)
LEDGER_LABEL = "tideflow.io/ledger"
BUCKETS = 4
COMMIT_SPACING_SECONDS = 0.5
REMOVAL_SECONDS = 10.0
# The kept assignments of one ConfigMap, in all (packed): half of what it holds.
KEPT_BYTES = 512 * 1024


class LedgerFull(ValueError):
    """An assignment not kept: its ConfigMap's kept assignments would pass KEPT_BYTES."""


def spec_digest(spec: Mapping[str, Any] | None) -> str:
    """A stable digest of a Workflow spec, ``suspend`` and cloud-only fields left out.

    Those may change after assignment (``suspend`` is sent as a control, the
    cloud-only fields never reach the site: ``tideflow.spec.CLOUD_ONLY_FIELDS``).
    """
    body = {k: v for k, v in site_spec(dict(spec or {})).items() if k != "suspend"}
    encoded = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(encoded.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Entry:
    """One assignment as the ledger keeps it."""

    site: str
    uid: str
    namespace: str
    name: str
    generation: int
    spec_digest: str

    def encode(self) -> str:
        return json.dumps(
            {"ns": self.namespace, "name": self.name, "gen": self.generation,
             "spec": self.spec_digest, "site": self.site},
            separators=(",", ":"),
        )  # fmt: skip

    @classmethod
    def decode(cls, site: str | None, uid: str, text: str) -> Entry | None:
        """An entry; ``site`` is its ConfigMap's for an older per-site one (None: in the entry).

        None (logged) for one that no run can have: a key that is no run uid (a
        ConfigMap key may be 253 characters of another alphabet) was read as an
        entry, and building the cancel of its run raised at start-up.
        """
        if not _RUN_UID.fullmatch(uid):
            log.warning("ledger %s: key %s is no run uid; ignored", site or "", wire.shown(uid))
            return None
        try:
            data = json.loads(text)
            return cls(
                site=str(data["site"]) if site is None else site, uid=uid,
                namespace=str(data["ns"]), name=str(data["name"]),
                generation=int(data["gen"]), spec_digest=str(data["spec"]),
            )  # fmt: skip
        except (ValueError, KeyError, TypeError):
            log.warning("ledger %s: entry %s is unreadable; ignored", site or "", uid)
            return None


class LedgerStore(Protocol):
    """The Kubernetes calls the ledger needs (``Kube`` implements them).

    ``name`` is a ConfigMap's; ``data`` keys are run uids, and
    ``<uid>.assigned`` for a kept assignment; None removes a key.
    """

    async def patch_ledger(
        self, namespace: str, name: str, data: dict[str, str | None]
    ) -> None: ...

    async def read_ledgers(self, namespace: str) -> dict[str, dict[str, str]]:
        """ConfigMap name -> its data, for every ledger ConfigMap of ``namespace``."""
        ...


ASSIGNED_SUFFIX = ".assigned"


def pack(payload: Mapping[str, Any]) -> str:
    raw = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    return base64.b64encode(gzip.compress(raw, mtime=0)).decode()


def unpack(text: str) -> dict[str, Any] | None:
    try:
        return dict(json.loads(gzip.decompress(base64.b64decode(text))))
    except (ValueError, OSError, TypeError):
        return None


def configmap_name(site: str) -> str:
    """The ConfigMap a site's new entries go to (a stable hash of its name)."""
    return f"{BUCKET_PREFIX}{zlib.crc32(site.encode()) % BUCKETS}"


def _old_site(name: str) -> str | None:
    """The site of an older operator's per-site ConfigMap, or None for a shared one."""
    return name.removeprefix(CONFIGMAP_PREFIX) if name.startswith(CONFIGMAP_PREFIX) else None


class Ledger:
    """The record of assigned runs, mirrored in memory."""

    def __init__(
        self, store: LedgerStore, namespace: str, *, spacing: float = COMMIT_SPACING_SECONDS
    ) -> None:
        self.store = store
        self.namespace = namespace
        self.spacing = spacing
        self.entries: dict[str, dict[str, Entry]] = {}  # site -> uid -> entry
        self._home: dict[str, str] = {}  # uid -> the ConfigMap it lives in
        # Per ConfigMap name:
        self._pending: dict[str, dict[str, str | None]] = {}
        self._version: dict[str, int] = {}  # bumped by every change
        self._written: dict[str, int] = {}  # highest version stored
        self._locks: dict[str, asyncio.Lock] = {}
        self._last: dict[str, float] = {}  # monotonic: when its last write started
        self._warned: dict[str, float] = {}
        self._kept: dict[str, dict[str, str]] = {}  # site -> uid -> packed assignment
        self.writes = 0  # patches sent (the benchmark reads it)

    async def load(self) -> None:
        """Read every entry (at start-up, before anything is sent)."""
        for name, data in (await self.store.read_ledgers(self.namespace)).items():
            old_site = _old_site(name)
            sites: dict[str, str] = {}  # uid -> site, for the kept assignments below
            for uid, text in data.items():
                if uid.endswith(ASSIGNED_SUFFIX):
                    continue
                entry = Entry.decode(old_site, uid, text)
                if entry is not None:
                    self.entries.setdefault(entry.site, {})[uid] = entry
                    self._home[uid] = name
                    sites[uid] = entry.site
            for key, text in data.items():
                uid = key.removesuffix(ASSIGNED_SUFFIX)
                site = old_site or sites.get(uid)
                if key.endswith(ASSIGNED_SUFFIX) and site is not None:
                    self._kept.setdefault(site, {})[uid] = text
                    self._home.setdefault(uid, name)

    def keep_sites(self, keep: Callable[[str], bool]) -> None:
        """Forget the entries of sites ``keep`` refuses (another operator shard's: shards.py)."""
        for site in [s for s in self.entries if not keep(s)]:
            del self.entries[site]
        for site in [s for s in self._kept if not keep(s)]:
            del self._kept[site]

    async def keep_assigned(self, site: str, uid: str, payload: Mapping[str, Any]) -> None:
        """Keep the assignment as sent (a refused edit must not replace it after a restart)."""
        if uid in self._kept.get(site, {}):
            return
        packed = pack(payload)
        home = self._home_of(site, uid)
        kept = sum(
            len(text)
            for uids in self._kept.values()
            for kept_uid, text in uids.items()
            if self._home.get(kept_uid) == home
        )
        if kept + len(packed) > KEPT_BYTES:
            raise LedgerFull(
                f"the assignment is not kept in the ledger: {len(packed)} bytes packed, "
                f"with the {kept} kept in {home}, pass its {KEPT_BYTES} bytes for kept "
                f"assignments; if the operator restarts before site {site} confirms it, "
                "it is not sent again (the Workflow says so)"
            )
        self._kept.setdefault(site, {})[uid] = packed
        await self._commit(home, self._change(home, uid + ASSIGNED_SUFFIX, packed))

    def kept_assigned(self, site: str, uid: str) -> dict[str, Any] | None:
        text = self._kept.get(site, {}).get(uid)
        return unpack(text) if text is not None else None

    def get(self, site: str, uid: str) -> Entry | None:
        return self.entries.get(site, {}).get(uid)

    def find(self, uid: str) -> Entry | None:
        for entries in self.entries.values():
            if uid in entries:
                return entries[uid]
        return None

    def all(self) -> list[Entry]:
        return [e for entries in self.entries.values() for e in entries.values()]

    def _home_of(self, site: str, uid: str) -> str:
        return self._home.setdefault(uid, configmap_name(site))

    def _change(self, name: str, key: str, value: str | None) -> int:
        self._pending.setdefault(name, {})[key] = value
        version = self._version.get(name, 0) + 1
        self._version[name] = version
        return version

    async def record(self, entry: Entry) -> None:
        """Store ``entry``; returns once it is in Kubernetes (group-committed).

        Raises if the write failed (the caller does not send the assignment and
        tries again), except when the API server forbids it (403: an RBAC made
        for an older operator): then the error is logged and the run goes out
        without its entry, rather than no Workflow being assigned at all.
        """
        self.entries.setdefault(entry.site, {})[entry.uid] = entry
        home = self._home_of(entry.site, entry.uid)
        version = self._change(home, entry.uid, entry.encode())
        try:
            await self._commit(home, version)
        except Exception as exc:
            if getattr(exc, "status", None) != 403:
                raise
            log.error(
                "the ledger (%s) cannot be written (%s): a Workflow deleted while no "
                "operator runs will not be cancelled at its site; grant configmaps "
                "list/create/patch in namespace %s", home, exc, self.namespace,
            )  # fmt: skip

    def discard(self, site: str, uid: str) -> None:
        """Forget ``uid`` (written with the next commit or flush)."""
        home = self._home.get(uid)
        if home is None:
            return
        if self.entries.get(site, {}).pop(uid, None) is not None:
            self._change(home, uid, None)
        if self._kept.get(site, {}).pop(uid, None) is not None:
            self._change(home, uid + ASSIGNED_SUFFIX, None)
        if uid not in self.entries.get(site, {}) and uid not in self._kept.get(site, {}):
            self._home.pop(uid, None)

    async def flush(self, *, removals_every: float = 0.0) -> None:
        """Write every pending change (housekeeping).

        ``removals_every``: a ConfigMap with only removals pending is written
        only if its last write is at least that old (they are never urgent).
        """
        now = time.monotonic()
        for name, pending in list(self._pending.items()):
            if not pending:
                continue
            only_removals = all(value is None for value in pending.values())
            if only_removals and now - self._last.get(name, float("-inf")) < removals_every:
                continue
            try:
                await self._commit(name, self._version[name])
            except Exception as exc:  # retried at the next flush; said once a minute
                if now - self._warned.get(name, float("-inf")) >= 60:
                    self._warned[name] = now
                    log.warning("could not write the ledger %s: %s", name, exc)

    async def _commit(self, name: str, version: int) -> None:
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            if self._written.get(name, 0) >= version:
                return  # a write made while we waited carried our change
            # At most one write per ConfigMap every `spacing` seconds: what arrives
            # meanwhile (a burst's other admissions) shares the next one.
            wait = self._last.get(name, float("-inf")) + self.spacing - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            batch = self._pending.pop(name, {})
            upto = self._version.get(name, 0)
            if not batch:
                self._written[name] = upto
                return
            self._last[name] = time.monotonic()
            try:
                await self.store.patch_ledger(self.namespace, name, batch)
            except BaseException:
                # Put the batch back under anything newer that arrived meanwhile.
                newer = self._pending.get(name, {})
                self._pending[name] = {**batch, **newer}
                raise
            self.writes += 1
            self._written[name] = upto
