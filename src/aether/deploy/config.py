"""Slice configuration and secrets (docs/slices.md, *Configuration and secrets*).

Owns: the `{ secret = "NAME" }` reference syntax inside `[slices.NAME.config]` tables, which config
an artifact gets when several blueprints list it, resolving references against the `secrets/`
keys, the fingerprint that tells a node its running instances have an outdated config, and the
secret store operations the management API uses (`Secrets`). The functions are pure; `SliceConfigs`
and `Secrets` read and write the node's `KVStore`. May import `aether.core`, `aether.kv` and
`aether.deploy.rollout` (its states).

Decisions:
- An artifact's config is the non-empty `config` of the blueprints listing it (coordinates
  exact). Two blueprints giving the same artifact different configs are refused when the second
  is applied (400 naming both). Should two applies race on different nodes and both pass that
  check, the blueprint whose id sorts first gives the config, the same on every node.
- A reference to a secret that is not set is not refused at apply time (secrets and blueprints
  can be set in either order): the instance goes FAILED with a reason naming the secret, and the
  leader's retry after the backoff picks up the secret once it is set.
- The old version of an active rollout, which the blueprints no longer list, keeps the settings
  it was deployed with: the slice the rollout recorded (`RolloutValue.old_slice`), so a blueprint
  that changes the version and the config together neither reconfigures the serving old
  instances nor starts old instances again (a rollback) with the new version's config.
- The fingerprint hashes the config (references, not values) and the `version` of each secret
  it names: a node can tell that something changed without ever hashing a secret value.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import msgspec

from aether.core.errors import BadRequest, StatusError
from aether.core.secrets import MissingSecret, ResolvedConfig
from aether.deploy.rollout import ACTIVE_STATES
from aether.kv.keys import (
    BlueprintSlice,
    BlueprintValue,
    EntryPolicy,
    RolloutValue,
    SecretKey,
    SecretValue,
    check_secret_name,
)

__all__ = [
    "SECRET_REF",
    "SecretInUse",
    "SecretInfo",
    "SecretNotFound",
    "Secrets",
    "SliceConfigs",
    "check_config",
    "config_conflict",
    "config_of",
    "fingerprint",
    "limits_of",
    "resolve",
    "secret_names",
    "secret_users",
]

SECRET_REF = "secret"
"""The one key of a secret reference table: `db_password = { secret = "db-password" }`."""

_encode = msgspec.msgpack.Encoder(order="deterministic").encode


def _walk(value: Any, path: str) -> Iterable[tuple[str, Any]]:
    """Every (path, table) of the tables inside `value` (tables in arrays included)."""
    if isinstance(value, dict):
        yield path, value
        for k, v in value.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk(v, f"{path}[{i}]")


def _ref(table: Mapping[str, Any]) -> str | None:
    """The secret a table references, None if it is an ordinary table."""
    if SECRET_REF not in table:
        return None
    name = table[SECRET_REF]
    return name if len(table) == 1 and isinstance(name, str) else None


def check_config(config: Mapping[str, Any]) -> None:
    """Raise BadRequest naming the key when a table uses `secret` but is not exactly
    `{ secret = "NAME" }` with a valid secret name."""
    for path, table in _walk(dict(config), ""):
        if SECRET_REF not in table:
            continue
        name = table[SECRET_REF]
        where = path or "the config table"
        if len(table) != 1 or not isinstance(name, str):
            raise BadRequest(
                f"{where}: a secret reference is a table with the one key secret, e.g. "
                f'{{ secret = "db-password" }}; got keys {", ".join(sorted(table))}'
            )
        try:
            check_secret_name(name)
        except BadRequest as e:
            raise BadRequest(f"{where}: {e}") from None


def secret_names(config: Mapping[str, Any]) -> list[str]:
    """The secrets `config` references, sorted, each once."""
    return sorted({n for _, t in _walk(dict(config), "") if (n := _ref(t)) is not None})


def resolve(
    config: Mapping[str, Any], secrets: Mapping[str, str], artifact: str = "the slice"
) -> ResolvedConfig:
    """`config` with each reference replaced by its secret's value; `MissingSecret` names the
    secrets that are not set (never a value)."""
    missing = [n for n in secret_names(config) if n not in secrets]
    if missing:
        names = ", ".join(repr(n) for n in missing)
        fix = "; ".join(f"set it with `aether secret set {n}`" for n in missing)
        raise MissingSecret(
            f"the config of {artifact} names the secret{'s' if len(missing) > 1 else ''} {names}, "
            f"which {'are' if len(missing) > 1 else 'is'} not set: {fix}"
        )
    used: list[str] = []

    def fill(value: Any) -> Any:
        if isinstance(value, dict):
            name = _ref(value)
            if name is not None:
                used.append(secrets[name])
                return secrets[name]
            return {k: fill(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fill(v) for v in value]
        return value

    values = fill(dict(config))
    return ResolvedConfig(values, tuple(used))


def _recorded(rollouts: Iterable[RolloutValue], artifact: str) -> BlueprintSlice | None:
    """The slice an active rollout recorded for `artifact` as its old version, or None."""
    for r in rollouts:
        if r.state in ACTIVE_STATES and f"{r.artifact}:{r.old_version}" == artifact:
            return r.old_slice
    return None


def slices_of(
    blueprints: Iterable[BlueprintValue], artifact: str, rollouts: Iterable[RolloutValue] = ()
) -> list[BlueprintSlice]:
    """The blueprint slices of `artifact` (full coordinates). A rollout runs a version the
    blueprints no longer list (the old one): its instances keep the slice the rollout recorded for
    it (`RolloutValue.old_slice`: the settings they were deployed with, not the new version's);
    without such a record (a rollout started by an older node), the slices of the other versions
    of the artifact, not none (which would reconfigure the serving old instances with an empty
    config)."""
    bps = list(blueprints)
    exact = [s for bp in bps for s in bp.slices if s.artifact == artifact]
    if exact:
        return exact
    recorded = _recorded(rollouts, artifact)
    if recorded is not None:
        return [recorded]
    name = artifact.rpartition(":")[0]
    return [s for bp in bps for s in bp.slices if s.artifact.rpartition(":")[0] == name]


def config_of(
    blueprints: Iterable[BlueprintValue], artifact: str, rollouts: Iterable[RolloutValue] = ()
) -> dict[str, Any]:
    """The config of `artifact` (full coordinates; see `slices_of`): the first non-empty one the
    blueprints give."""
    for s in slices_of(blueprints, artifact, rollouts):
        if s.config:
            return dict(s.config)
    return {}


def limits_of(
    blueprints: Iterable[BlueprintValue], artifact: str, rollouts: Iterable[RolloutValue] = ()
) -> BlueprintSlice | None:
    """The slice of the blueprints that gives `artifact` (full coordinates; see `slices_of`) its
    capacity limits (`max_concurrency`, `max_queue`, `entry_concurrency`): the first that sets any,
    else None."""
    for s in slices_of(blueprints, artifact, rollouts):
        if s.max_concurrency is not None or s.entry_concurrency:
            return s
    return None


def entry_policies_of(
    blueprints: Iterable[BlueprintValue], artifact: str, rollouts: Iterable[RolloutValue] = ()
) -> dict[str, EntryPolicy]:
    """The per-entry policy overrides (`[slices.NAME.entries.ENTRY]`) of `artifact` (full
    coordinates): those of the first blueprint slice of that very version that sets any, else
    those an active rollout recorded for it as its old version, else none. Not those of another
    version (`slices_of`'s fallback): a policy for an entry the version lacks fails its activation
    (`UnknownEntryPolicy`), so the old version of a rollout, started again by a rollback, would fail
    on a policy the new version's entries ask for (policies are read at activation only: the
    running instances keep theirs)."""
    for bp in blueprints:
        for s in bp.slices:
            if s.artifact == artifact and s.entries:
                return dict(s.entries)
    recorded = _recorded(rollouts, artifact)
    return dict(recorded.entries) if recorded is not None else {}


def config_conflict(
    blueprints: Iterable[tuple[str, BlueprintValue]], blueprint_id: str, value: BlueprintValue
) -> str | None:
    """Why storing `value` as `blueprint_id` would give an artifact two configs, or None."""
    mine = {s.artifact: s.config for s in value.slices if s.config}
    for other_id, other in blueprints:
        if other_id == blueprint_id:
            continue
        for s in other.slices:
            cfg = mine.get(s.artifact)
            if cfg is not None and s.config and _encode(s.config) != _encode(cfg):
                return (
                    f"{s.artifact} is configured differently by blueprint {other_id!r}; an artifact has "
                    f"one config: give the same [slices.NAME.config] in both, or configure it in one only"
                )
    return None


def secret_users(blueprints: Iterable[tuple[str, BlueprintValue]], name: str) -> list[str]:
    """The ids of the blueprints whose configs reference the secret `name`, sorted."""
    return sorted({bp_id for bp_id, v in blueprints for s in v.slices if name in secret_names(s.config)})


def fingerprint(config: Mapping[str, Any], versions: Mapping[str, int | None]) -> str:
    """A digest of `config` (its references, not the secret values) and of the version of each
    secret it names (None: not set). Equal fingerprints: the instances would get the same config."""
    names = secret_names(config)
    h = hashlib.sha256(_encode(dict(config)))
    h.update(_encode([(n, versions.get(n)) for n in names]))
    return h.hexdigest()[:32]


# --- adapters over the node's store --------------------------------------------------------------


class SliceConfigs:
    """The config of each artifact as this node's replica has it (blueprints and secrets)."""

    def __init__(self, kv: Any) -> None:
        self.kv = kv  # the node's `aether.kv.contract.ClusterStore` (list_local, get_local)

    def _blueprints(self) -> list[BlueprintValue]:
        return [v for _, v in self.kv.list_local("blueprints/") if isinstance(v, BlueprintValue)]

    def _rollouts(self) -> list[RolloutValue]:
        return [v for _, v in self.kv.list_local("rollouts/") if isinstance(v, RolloutValue)]

    def _secret(self, name: str) -> SecretValue | None:
        v = self.kv.get_local(SecretKey(name))
        return v if isinstance(v, SecretValue) else None

    def raw(self, artifact: str) -> dict[str, Any]:
        return config_of(self._blueprints(), artifact, self._rollouts())

    def limits(self, artifact: object) -> BlueprintSlice | None:
        """The blueprint slice that gives `artifact` its capacity limits (`limits_of`), or None."""
        return limits_of(self._blueprints(), str(artifact), self._rollouts())

    def entry_policies(self, artifact: object) -> dict[str, EntryPolicy]:
        """The blueprints' per-entry policy overrides of `artifact` (`entry_policies_of`)."""
        return entry_policies_of(self._blueprints(), str(artifact), self._rollouts())

    def fingerprint(self, artifact: str) -> str:
        config = self.raw(artifact)
        versions = {
            n: (s.version if (s := self._secret(n)) is not None else None) for n in secret_names(config)
        }
        return fingerprint(config, versions)

    def resolved(self, artifact: object) -> ResolvedConfig:
        """The config `artifact`'s instances get now (`MissingSecret` if a secret is not set)."""
        coords = str(artifact)
        config = self.raw(coords)
        secrets = {n: s.value for n in secret_names(config) if (s := self._secret(n)) is not None}
        return resolve(config, secrets, coords)


class SecretInfo(msgspec.Struct, frozen=True):
    """What may be shown of a secret: never its value."""

    name: str
    created: float
    updated: float
    version: int


class SecretNotFound(StatusError):
    status = 404


class SecretInUse(StatusError):
    status = 409


MAX_SECRET_BYTES = 64 * 1024


class Secrets:
    """Set, list and delete the `secrets/` keys (the management API's secret endpoints)."""

    def __init__(self, kv: Any, *, timeout: float = 5.0, wall: Any = time.time) -> None:
        self.kv = kv
        self.timeout = timeout
        self._wall = wall

    def list(self) -> list[SecretInfo]:
        out = []
        for key, v in self.kv.list_local("secrets/"):
            if isinstance(v, SecretValue):
                out.append(SecretInfo(key[len("secrets/"):], v.created, v.updated, v.version))
        return sorted(out, key=lambda s: s.name)

    async def set(
        self, name: str, value: str
    ) -> tuple[SecretInfo, Literal["created", "changed", "unchanged"]]:
        """Store `value` under `name`; returns its info and what happened. Setting the value it
        already has changes nothing ("unchanged": same version, nothing restarts)."""
        check_secret_name(name)
        if not value:
            raise BadRequest(f"secret {name!r}: the value is empty")
        if len(value.encode()) > MAX_SECRET_BYTES:
            raise BadRequest(f"secret {name!r}: the value exceeds {MAX_SECRET_BYTES} bytes")
        key = SecretKey(name)
        for _ in range(20):
            current = self.kv.get_local(key)
            now = self._wall()
            if isinstance(current, SecretValue):
                if current.value == value:
                    return SecretInfo(name, current.created, current.updated, current.version), "unchanged"
                new = SecretValue(value, current.created, now, current.version + 1)
            else:
                current, new = None, SecretValue(value, now, now, 1)
            if await self.kv.compare_and_set(key, current, new, self.timeout):
                return SecretInfo(name, new.created, new.updated, new.version), (
                    "created" if current is None else "changed"
                )
        raise BadRequest(f"secret {name!r} keeps changing; try again")

    async def delete(self, name: str) -> None:
        """Remove a secret; refused (409) while a blueprint's config references it."""
        check_secret_name(name)
        users = secret_users(
            ((k[len("blueprints/"):], v) for k, v in self.kv.list_local("blueprints/")
             if isinstance(v, BlueprintValue)),
            name,
        )
        if users:
            raise SecretInUse(
                f"secret {name!r} is used by the config of blueprint{'s' if len(users) > 1 else ''} "
                f"{', '.join(users)}: remove the references first (re-apply the blueprint), then delete it"
            )
        if not await self.kv.remove(SecretKey(name), self.timeout):
            raise SecretNotFound(f"no secret {name!r}")
