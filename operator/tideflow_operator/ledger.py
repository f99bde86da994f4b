"""What each site was sent to run, kept in Kubernetes so a restarted operator knows it.

Why: a Workflow deleted while the operator is down (or while a standby takes
over) is gone from the API server, and with it the only trace that a site is
running it.  Without the finalizer (deleted before kopf added it, or the
finalizer removed by hand) nothing would ever send the cancel.  So before an
assignment is published, the operator records it here: one ConfigMap per site
in the operator's own namespace (``tideflow-ledger-<site>``), one data key per
run uid.  At start-up and periodically the operator compares these entries
with the Workflows that exist and sends a cancel for each run whose Workflow is
gone.

Each entry also carries the digest of the spec that was assigned (``suspend``
left out): after a restart the assignment is re-sent only if the Workflow's
spec still has that digest, so an edit that was refused is never sent.  When
an edit is refused while the site has not yet confirmed the assignment, the
assignment itself is kept too (gzip and base64, under ``<uid>.assigned``), so
a restarted operator can re-send exactly that.

Writes are group commits: every admission that arrives while a write is in
flight shares the next merge patch of that site's ConfigMap, so a burst of 500
admissions costs a handful of patches, not 500.  Removals (runs that finished,
cancels that were delivered) are lazy: they ride along with the next write or
the housekeeping flush; an entry removed late costs at most one spare cancel.

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
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from tideflow.spec import site_spec

log = logging.getLogger(__name__)

CONFIGMAP_PREFIX = "tideflow-ledger-"
LEDGER_LABEL = "tideflow.io/ledger"


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
             "spec": self.spec_digest},
            separators=(",", ":"),
        )  # fmt: skip

    @classmethod
    def decode(cls, site: str, uid: str, text: str) -> Entry | None:
        try:
            data = json.loads(text)
            return cls(
                site=site, uid=uid, namespace=str(data["ns"]), name=str(data["name"]),
                generation=int(data["gen"]), spec_digest=str(data["spec"]),
            )  # fmt: skip
        except (ValueError, KeyError, TypeError):
            log.warning("ledger of site %s: entry %s is unreadable; ignored", site, uid)
            return None


class LedgerStore(Protocol):
    """The Kubernetes calls the ledger needs (``Kube`` implements them).

    ``data`` keys are run uids, and ``<uid>.assigned`` for a kept assignment;
    None removes a key.
    """

    async def patch_ledger(
        self, namespace: str, name: str, site: str, data: dict[str, str | None]
    ) -> None: ...

    async def read_ledgers(self, namespace: str) -> dict[str, dict[str, str]]: ...


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
    return f"{CONFIGMAP_PREFIX}{site}"


class Ledger:
    """The per-site record of assigned runs, mirrored in memory."""

    def __init__(self, store: LedgerStore, namespace: str) -> None:
        self.store = store
        self.namespace = namespace
        self.entries: dict[str, dict[str, Entry]] = {}  # site -> uid -> entry
        self._pending: dict[str, dict[str, str | None]] = {}
        self._version: dict[str, int] = {}  # bumped by every change
        self._written: dict[str, int] = {}  # highest version stored
        self._locks: dict[str, asyncio.Lock] = {}
        self._warned: dict[str, float] = {}
        self._kept: dict[str, dict[str, str]] = {}  # site -> uid -> packed assignment

    async def load(self) -> None:
        """Read every site's entries (at start-up, before anything is sent)."""
        for site, data in (await self.store.read_ledgers(self.namespace)).items():
            entries = self.entries.setdefault(site, {})
            for uid, text in data.items():
                if uid.endswith(ASSIGNED_SUFFIX):
                    self._kept.setdefault(site, {})[uid.removesuffix(ASSIGNED_SUFFIX)] = text
                    continue
                entry = Entry.decode(site, uid, text)
                if entry is not None:
                    entries[uid] = entry

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
        self._kept.setdefault(site, {})[uid] = packed
        await self._commit(site, self._change(site, uid + ASSIGNED_SUFFIX, packed))

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

    def _change(self, site: str, uid: str, value: str | None) -> int:
        self._pending.setdefault(site, {})[uid] = value
        version = self._version.get(site, 0) + 1
        self._version[site] = version
        return version

    async def record(self, entry: Entry) -> None:
        """Store ``entry``; returns once it is in Kubernetes (group-committed).

        Raises if the write failed (the caller does not send the assignment and
        tries again), except when the API server forbids it (403: an RBAC made
        for an older operator): then the error is logged and the run goes out
        without its entry, rather than no Workflow being assigned at all.
        """
        self.entries.setdefault(entry.site, {})[entry.uid] = entry
        version = self._change(entry.site, entry.uid, entry.encode())
        try:
            await self._commit(entry.site, version)
        except Exception as exc:
            if getattr(exc, "status", None) != 403:
                raise
            log.error(
                "the ledger of site %s cannot be written (%s): a Workflow deleted while no "
                "operator runs will not be cancelled at its site; grant configmaps "
                "list/create/patch in namespace %s", entry.site, exc, self.namespace,
            )  # fmt: skip

    def discard(self, site: str, uid: str) -> None:
        """Forget ``uid`` (written with the next commit or flush)."""
        if self.entries.get(site, {}).pop(uid, None) is not None:
            self._change(site, uid, None)
        if self._kept.get(site, {}).pop(uid, None) is not None:
            self._change(site, uid + ASSIGNED_SUFFIX, None)

    async def flush(self) -> None:
        """Write every pending change (housekeeping)."""
        for site in [s for s, pending in self._pending.items() if pending]:
            try:
                await self._commit(site, self._version[site])
            except Exception as exc:  # retried at the next flush; said once a minute
                now = time.monotonic()
                if now - self._warned.get(site, float("-inf")) >= 60:
                    self._warned[site] = now
                    log.warning("could not write the ledger of site %s: %s", site, exc)

    async def _commit(self, site: str, version: int) -> None:
        lock = self._locks.setdefault(site, asyncio.Lock())
        async with lock:
            if self._written.get(site, 0) >= version:
                return  # a write made while we waited carried our change
            batch = self._pending.pop(site, {})
            upto = self._version.get(site, 0)
            if not batch:
                self._written[site] = upto
                return
            try:
                await self.store.patch_ledger(self.namespace, configmap_name(site), site, batch)
            except BaseException:
                # Put the batch back under anything newer that arrived meanwhile.
                newer = self._pending.get(site, {})
                self._pending[site] = {**batch, **newer}
                raise
            self._written[site] = upto
