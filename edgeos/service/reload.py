"""What a reload changes: stable tag ids for the new config, and which devices to (re)start.

A runtime tag id is an index into columns (the pipeline's, the latest values', the store's map
to its own ids) and is carried by every batch already read. So a reload never renumbers: a tag
keeps its id while its device, name, kind and unit stay the same; a new tag, or one whose kind
or unit changed (a new meaning), gets an id above every id given before. Ids only grow, like
the store's tag table and the upstream tag dictionary; a batch read before the reload keeps
meaning what it meant. Devices whose configuration is identical are untouched (their adapter
keeps running, no gap); the others are stopped, started or restarted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from edgeos.adapter import DeviceConfig
from edgeos.config.model import Config
from edgeos.model import TagMeta

TagKey = tuple[str, str]  # (device, tag name)


@dataclass
class TagIds:
    """Every runtime tag id given in this process, by (device, name): the current meaning."""

    known: dict[TagKey, TagMeta] = field(default_factory=dict)
    next_id: int = 0

    @classmethod
    def of(cls, config: Config) -> TagIds:
        tags = config.tags
        return cls({(t.device, t.name): t for t in tags}, max((t.id for t in tags), default=-1) + 1)

    def renumber(self, config: Config) -> tuple[Config, list[TagMeta]]:
        """`config` (as loaded: positional ids) with stable ids, and the tags given a new id.
        Nothing is recorded until `commit`: a refused reload gives no id."""
        nid = self.next_id
        new: list[TagMeta] = []
        devices = []
        for d in config.devices:
            tags = []
            for t in d.tags:
                old = self.known.get((d.name, t.name))
                if old is not None and (old.kind, old.unit) == (t.meta.kind, t.meta.unit):
                    meta = dataclasses.replace(t.meta, id=old.id)
                else:
                    meta = dataclasses.replace(t.meta, id=nid)
                    nid += 1
                    new.append(meta)
                tags.append(dataclasses.replace(t, meta=meta))
            devices.append(dataclasses.replace(d, tags=tuple(tags)))
        return dataclasses.replace(config, devices=tuple(devices)), new

    def commit(self, config: Config) -> None:
        for t in config.tags:
            self.known[(t.device, t.name)] = t
            self.next_id = max(self.next_id, t.id + 1)


@dataclass
class Plan:
    added: list[DeviceConfig]
    removed: list[str]
    changed: list[DeviceConfig]
    unchanged: list[str]
    restart_needed: list[str]  # config sections a reload does not apply

    def summary(self) -> dict[str, object]:
        return {
            "added": [d.name for d in self.added],
            "removed": list(self.removed),
            "changed": [d.name for d in self.changed],
            "unchanged": list(self.unchanged),
            "restart_needed": list(self.restart_needed),
        }


def plan(old: Config, new: Config) -> Plan:
    """Devices to start, stop and restart; `new` must carry stable ids (TagIds.renumber)."""
    before = {d.name: d for d in old.devices}
    after = {d.name: d for d in new.devices}
    restart = [
        name for name, a, b in (("gateway", old.gateway, new.gateway), ("store", old.store, new.store)) if a != b
    ]
    for name in ("upstream", "http", "health", "console"):
        if getattr(old, name, None) != getattr(new, name, None):
            restart.append(name)
    return Plan(
        added=[d for n, d in after.items() if n not in before],
        removed=[n for n in before if n not in after],
        changed=[d for n, d in after.items() if n in before and before[n] != d],
        unchanged=[n for n, d in after.items() if before.get(n) == d],
        restart_needed=restart,
    )
