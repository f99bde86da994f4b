"""Reading a Workflow manifest: bounded, UTF-8, YAML without duplicate keys.

What ``tideflow-agent run-local`` and the demo read before the Workflow
model (:func:`tideflow.spec.parse_workflow`) sees it; a manifest that cannot
be read is a :class:`~tideflow.spec.SpecError` naming the file.  Apart from
:mod:`tideflow.spec` because it is about bytes and files (sizes, encodings,
FIFOs, YAML's quirks), not about what a Workflow means.
"""

from __future__ import annotations

import os
import stat
from typing import Any

import yaml

from tideflow.spec import SpecError

#: Largest manifest file (or text) :func:`read_manifest`/:func:`load_manifest`
#: accept.  Why 2 MiB: Kubernetes stores no object over 1.5 MiB (etcd's
#: request limit) and an assignment travels in one MQTT message of at most
#: 1 MiB (:data:`tideflow.wire.DEFAULT_MAX_MESSAGE_BYTES`), so every Workflow
#: the cloud can carry fits, with room for YAML's comments and indentation;
#: 5,000 tasks (the CRD's ``maxItems``) of ordinary size (~200 bytes each) fit.
#: The YAML parse dominates what a manifest costs (about 2 s per MiB on this
#: project's 2-core machine, ``bench/validation_cost.py``), where an unbounded
#: 50 MB manifest took 16 s and 402 MB before anything ran.
MAX_MANIFEST_BYTES = 2 * 1024 * 1024


_YAMLLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _DuplicateKey(yaml.YAMLError):
    pass


class ManifestLoader(_YAMLLoader):  # type: ignore[misc,valid-type]
    """YAML's safe loader, refusing a mapping that repeats a key.

    PyYAML keeps the last of two equal keys without a word, so a reviewed
    ``command:`` could be overridden by a second one further down.  Merge
    keys (``<<: *base``) may still be overridden, as YAML intends.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:
                continue  # unhashable: the base class reports it
            if first is not key_node:
                raise _DuplicateKey(
                    f"duplicate key {key!r} at line {key_node.start_mark.line + 1}, column "
                    f"{key_node.start_mark.column + 1} (first at line "
                    f"{first.start_mark.line + 1})"
                )
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


def load_manifest(
    data: bytes | str, source: str = "(manifest)", *, max_bytes: int = MAX_MANIFEST_BYTES
) -> Any:
    """Parse one YAML manifest: bounded, UTF-8, no duplicate keys.

    Raises :class:`SpecError` whose field is ``source`` (the file name).
    The result is plain data for :func:`parse_workflow`.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if len(raw) > max_bytes:
        raise SpecError([(source, f"{len(raw)} bytes is over the {max_bytes}-byte limit")])
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise SpecError(
                [
                    (
                        source,
                        f"not UTF-8: byte 0x{raw[exc.start]:02x} at offset {exc.start} "
                        "(save the manifest as UTF-8)",
                    )
                ]
            ) from None
    else:
        text = data
    try:
        return yaml.load(text, Loader=ManifestLoader)  # a SafeLoader
    except _DuplicateKey as exc:
        raise SpecError([(source, str(exc))]) from None
    except yaml.YAMLError as exc:
        raise SpecError([(source, f"not valid YAML: {exc}")]) from None
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        raise SpecError([(source, f"not a usable value: {exc}")]) from None


def read_manifest(path: str | os.PathLike[str], *, max_bytes: int = MAX_MANIFEST_BYTES) -> Any:
    """Read and parse a manifest file (see :func:`load_manifest`).

    Reads at most ``max_bytes + 1`` bytes and refuses anything that is not a
    regular file (a FIFO or a device would block or never end).
    """
    name = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise SpecError([(name, f"cannot read manifest: {exc.strerror}")]) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SpecError([(name, "cannot read manifest: not a regular file")])
        if info.st_size > max_bytes:
            raise SpecError([(name, f"{info.st_size} bytes is over the {max_bytes}-byte limit")])
        chunks: list[bytes] = []
        left = max_bytes + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
    except OSError as exc:
        raise SpecError([(name, f"cannot read manifest: {exc.strerror}")]) from None
    finally:
        os.close(fd)
    return load_manifest(data, name, max_bytes=max_bytes)
