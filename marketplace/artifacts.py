"""Publish, pull and verify signed artifacts (models, adapters, chains) through a content store.

An artifact is a folder of files plus `envelope.json`: a DSSE envelope around an in-toto statement whose
subjects are the files' sha256 and whose predicate is the manifest (crypto.statement). Publishing adds every
file and then the envelope to the content store; the envelope's CID names the artifact. Pulling fetches the
envelope, verifies signature, publisher trust and version (no rollback) before any file is fetched, fetches each
file by the CID the manifest gives (the store verifies every block), checks sizes, digests and file headers, and
only then renames the complete folder into `artifacts/<name>/<version>/`. Any refusal is audited and leaves the
previous state as it was.
"""

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from crypto.identity import Identity
from crypto.refusal import Refused, VerificationError
from crypto.statement import build_statement, folder_digests, sha256_file, sign_statement
from crypto.verification import EmptyTrustPolicyError, TrustPolicy, VerifiedArtifact, verify_artifact, verify_files
from marketplace.cid import Cid, CidError
from marketplace.content_store import ContentStore, ContentStoreError
from marketplace.formats import FormatError, check_file_format
from marketplace.manifest import (
    ENVELOPE_FILE,
    AdapterInfo,
    ArtifactRef,
    FileEntry,
    Manifest,
    ManifestError,
    check_against_subjects,
    check_file_name,
    parse_manifest,
)
from marketplace.registry import ArtifactRecord, Registry, RollbackError
from marketplace.semver import SemVer, VersionError
from marketplace.unixfs import Profile

PUBLISH_PROFILE: Profile = "v1-raw"
MAX_ENVELOPE_BYTES = 8 * 1024 * 1024
MAX_CHAIN_DEPTH = 8
MAX_CHAIN_ARTIFACTS = 64
Progress = Callable[[str, int, int], None]  # (file name, bytes done, bytes total)


class ArtifactRefused(Refused):
    """A publish, pull or verify refused: `reason` (a code: the verifier's, or `refused`) and `detail`, the words
    that are also in the audit log and what users read."""

    def __init__(self, detail: str, reason: str = "refused") -> None:
        super().__init__(reason, detail)


@dataclass
class _ChainWalk:
    """One pull's walk through chain references: the envelopes already pulled, how deep it is, and whether the user
    allowed the pulled name to switch publishers (never for what a chain references)."""

    replace_publisher: bool = False
    seen: set[str] = field(default_factory=set)
    depth: int = 0


class NameResolver(Protocol):
    """Finds the envelope CIDs published for a name (the local registry; the DHT in the P2P layer)."""

    def resolve(self, name: str, version: str | None) -> list[str]:
        """Envelope CIDs for `name` (`version`, or every version), best first."""
        ...


@dataclass(frozen=True)
class Installed:
    """An artifact installed in this node: its folder, manifest, envelope CID, publisher and trust."""

    folder: Path
    manifest: Manifest
    envelope_cid: str
    publisher: str
    publisher_trusted: bool


class LocalResolver:
    """Resolves names through the artifacts this node knows (published or pulled here)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def resolve(self, name: str, version: str | None) -> list[str]:
        """Envelope CIDs of the known versions of `name`, highest first."""
        return [r.root_cid for r in self.registry.artifacts(name) if version is None or r.version == version]


class Marketplace:
    """Publish and pull artifacts under `root` (MIRADOR_HOME/artifacts) through `store`, recorded in `registry`."""

    def __init__(
        self,
        root: Path,
        store: ContentStore,
        registry: Registry,
        identity: Identity | None = None,
        resolver: NameResolver | None = None,
    ) -> None:
        self.root, self.store, self.registry, self.identity = root, store, registry, identity
        self.resolver = resolver or LocalResolver(registry)

    # publish ------------------------------------------------------------------------------------------------------
    def publish(
        self,
        path: Path,
        *,
        name: str,
        version: str,
        kind: str,
        license: str,
        description: str = "",
        adapter: AdapterInfo | None = None,
        references: list[ArtifactRef] | None = None,
        benchmarks: dict[str, float] | None = None,
        progress: Progress | None = None,
        leave_out: frozenset[str] = frozenset(),
    ) -> Installed:
        """Sign and publish a file or folder as `name@version` (a folder's files but those named in `leave_out`);
        it is also installed locally."""
        if self.identity is None:
            raise ArtifactRefused("publishing needs the node's identity")
        publisher = self.identity.fingerprint
        artifact = f"{name}@{version}"
        self._check_owner(name, publisher, "publish", artifact, False)
        try:
            self.registry.check_not_rollback(name, publisher, version)
            files, digests = _artifact_files(path, leave_out)
            for n, p in files.items():
                check_file_name(n)
                check_file_format(p)
            entries = []
            for n, p in files.items():
                added = self.store.add(p, PUBLISH_PROFILE, _per_file(progress, n))
                entries.append(FileEntry(n, p.stat().st_size, digests[n], added.cid, added.profile))
            manifest = parse_manifest(
                Manifest(
                    schema="mirador.manifest/v1",
                    kind=kind,  # type: ignore[arg-type]  # checked by parse_manifest
                    name=name,
                    version=version,
                    files=entries,
                    license=license,
                    description=description,
                    created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    adapter=adapter,
                    references=references,
                    benchmarks=benchmarks or {},
                ).to_dict()
            )
            statement = build_statement(digests, manifest.to_dict(), self.identity.public_key)
            envelope = sign_statement(self.identity, statement).to_json()
        except (ManifestError, FormatError, RollbackError, VersionError, ValueError, ContentStoreError) as exc:
            self.registry.audit("publish", artifact, publisher, "refused", str(exc))
            raise ArtifactRefused(str(exc)) from None
        with tempfile.TemporaryDirectory(dir=self._staging_root()) as tmp:
            env_path = Path(tmp) / ENVELOPE_FILE
            env_path.write_bytes(envelope)
            envelope_cid = self.store.add(env_path, PUBLISH_PROFILE).cid
            staged = Path(tmp) / "artifact"
            staged.mkdir()
            for n, p in files.items():
                (staged / n).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, staged / n)
            shutil.copyfile(env_path, staged / ENVELOPE_FILE)
            folder = self._install(staged, manifest)
        self._record(manifest, publisher, envelope, envelope_cid, folder)
        self.registry.audit("publish", artifact, publisher, "ok", envelope_cid)
        return Installed(folder, manifest, envelope_cid, publisher, True)

    # pull ---------------------------------------------------------------------------------------------------------
    def pull(
        self,
        target: str,
        *,
        trust_publisher: bool = False,
        replace_publisher: bool = False,
        progress: Progress | None = None,
    ) -> Installed:
        """Pull `NAME[@VERSION]` or an envelope CID: verify everything, then install atomically.

        A name installed here belongs to the publisher it came from: an envelope for the same name by another
        publisher is refused (`publisher_conflict`) unless `replace_publisher`, which installs it and removes the
        other publisher's versions of that name."""
        cids = self._candidates(target)
        try:
            return self._pull_cid(cids[0], target, trust_publisher, progress, _ChainWalk(replace_publisher))
        except ArtifactRefused:
            raise
        except (ContentStoreError, OSError) as exc:
            self.registry.audit("pull", target, "", "failed", str(exc))
            raise ArtifactRefused(f"fetching {target} failed: {exc}") from None

    def _candidates(self, target: str) -> list[str]:
        try:
            Cid.parse(target)
            return [target]
        except CidError:
            pass
        name, _, version = target.partition("@")
        cids = self.resolver.resolve(name, version or None)
        if not cids:
            reason = f"no published artifact named {target!r} is known (pull it by CID, or from a peer)"
            self.registry.audit("pull", target, "", "refused", reason)
            raise ArtifactRefused(reason)
        return cids

    def _pull_cid(
        self,
        envelope_cid: str,
        target: str,
        trust_publisher: bool,
        progress: Progress | None,
        walk: "_ChainWalk",
        expected: ArtifactRef | None = None,
    ) -> Installed:
        """Pull one envelope and its files; `expected` is the chain reference that named it (checked before use)."""
        with tempfile.TemporaryDirectory(dir=self._staging_root()) as tmp:
            env_path = Path(tmp) / ENVELOPE_FILE
            self.store.fetch(envelope_cid, env_path, max_bytes=MAX_ENVELOPE_BYTES)  # before anything else is read
            envelope = env_path.read_bytes()
            if expected is not None and hashlib.sha256(envelope).hexdigest() != expected.envelope_sha256:
                detail = f"the envelope at {envelope_cid} is not the one the chain references (sha256 differs)"
                raise self._refuse("pull", target, "", detail, "reference_mismatch")
            verified = self._verify_envelope(envelope, target, trust_publisher)
            publisher = verified.publisher.fingerprint
            manifest = self._checked_manifest(verified, target, publisher)
            if expected is not None and (manifest.name, manifest.version) != (expected.name, expected.version):
                detail = f"the chain references {target}, the envelope is {manifest.name}@{manifest.version}"
                raise self._refuse("pull", target, publisher, detail, "reference_mismatch")
            self._check_owner(manifest.name, publisher, "pull", target, walk.replace_publisher and expected is None)
            staged = Path(tmp) / "artifact"
            staged.mkdir()
            written: dict[str, str] = {}  # name -> sha256 of the bytes the store wrote (hashed as it wrote them)
            for entry in manifest.files:
                dest = staged / entry.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                progress_of = _per_file(progress, entry.name)
                written[entry.name] = self.store.fetch(entry.cid, dest, progress_of, max_bytes=entry.size)
            self._check_staged(staged, verified, manifest, target, publisher, written)
            if manifest.kind == "chain":  # what a chain uses is in place before the chain is
                self._pull_references(manifest, envelope_cid, trust_publisher, progress, walk)
            shutil.copyfile(env_path, staged / ENVELOPE_FILE)
            folder = self._install(staged, manifest)
        self._record(manifest, publisher, envelope, envelope_cid, folder)
        self._drop_other_publishers(manifest.name, publisher, folder)
        trust = "trusted" if verified.publisher_trusted else "untrusted, allowed by --trust-publisher"
        self.registry.audit("pull", f"{manifest.name}@{manifest.version}", publisher, "ok", f"{envelope_cid} ({trust})")
        return Installed(folder, manifest, envelope_cid, publisher, verified.publisher_trusted)

    def _check_owner(self, name: str, publisher: str, action: str, target: str, replace: bool) -> None:
        """Refuse `name` by `publisher` if this node holds `name` from another publisher (unless `replace`)."""
        owners = {r.publisher for r in self.registry.artifacts(name)} - {publisher}
        if owners and not replace:
            detail = (
                f"{name} is installed here from {', '.join(sorted(owners))}; this one is by {publisher} "
                "(pull with --replace-publisher to switch publishers: the other's versions are removed)"
            )
            raise self._refuse(action, target, publisher, detail, "publisher_conflict")

    def _drop_other_publishers(self, name: str, publisher: str, installed: Path) -> None:
        """Forget (and delete the folders of) `name`'s versions by other publishers (after an explicit replace)."""
        for record in self.registry.artifacts(name):
            if record.publisher == publisher:
                continue
            self.registry.remove(record.name, record.version, record.publisher)
            if Path(record.folder) != installed:  # the same version's folder now holds the new publisher's files
                shutil.rmtree(record.folder, ignore_errors=True)
            self.registry.audit("replace", f"{record.name}@{record.version}", record.publisher, "removed", publisher)

    def _pull_references(
        self, chain: Manifest, chain_cid: str, trust_publisher: bool, progress: Progress | None, walk: "_ChainWalk"
    ) -> None:
        """Pull every artifact a chain references, each envelope once per pull (a reference seen again, or a chain
        that references itself through others, is not pulled again), at most MAX_CHAIN_DEPTH deep and
        MAX_CHAIN_ARTIFACTS in all."""
        walk.seen.add(chain_cid)
        target = f"{chain.name}@{chain.version}"
        if walk.depth >= MAX_CHAIN_DEPTH:
            raise self._refuse("pull", target, "", f"chains nest deeper than {MAX_CHAIN_DEPTH}", "chain_too_deep")
        walk.depth += 1
        try:
            for ref in chain.references or []:
                if ref.envelope_cid in walk.seen:
                    continue
                walk.seen.add(ref.envelope_cid)
                if len(walk.seen) > MAX_CHAIN_ARTIFACTS:
                    detail = f"a chain may use at most {MAX_CHAIN_ARTIFACTS} artifacts"
                    raise self._refuse("pull", target, "", detail, "chain_too_large")
                self._pull_cid(ref.envelope_cid, f"{ref.name}@{ref.version}", trust_publisher, progress, walk, ref)
        finally:
            walk.depth -= 1

    def _refuse(
        self, action: str, artifact: str, publisher: str, detail: str, reason: str = "refused"
    ) -> ArtifactRefused:
        self.registry.audit(action, artifact, publisher, "refused", detail)
        return ArtifactRefused(detail, reason)

    def _policy(self, trust_publisher: bool) -> TrustPolicy:
        try:
            own = [self.identity.fingerprint] if self.identity is not None else []  # a node trusts itself
            trusted = [t.fingerprint for t in self.registry.trusted()] + own
            return TrustPolicy(trusted, allow_untrusted=trust_publisher)
        except EmptyTrustPolicyError:
            raise ArtifactRefused(
                "no publisher is trusted yet: `mirador trust add KEY`, or pass --trust-publisher for this pull"
            ) from None

    def _verify_envelope(self, envelope: bytes, target: str, trust_publisher: bool) -> VerifiedArtifact:
        if len(envelope) > MAX_ENVELOPE_BYTES:
            raise self._refuse("pull", target, "", f"the envelope is larger than {MAX_ENVELOPE_BYTES} bytes")
        try:
            policy = self._policy(trust_publisher)
        except ArtifactRefused as exc:
            raise self._refuse("pull", target, "", exc.detail) from None
        try:
            return verify_artifact(envelope, policy)
        except VerificationError as exc:
            raise self._refuse("pull", target, "", exc.detail, exc.reason) from None

    def _checked_manifest(self, verified: VerifiedArtifact, target: str, publisher: str) -> Manifest:
        try:
            manifest = parse_manifest(verified.statement.manifest)
            check_against_subjects(manifest, verified.statement.digests())
            self.registry.check_not_rollback(manifest.name, publisher, manifest.version)
        except (ManifestError, RollbackError, VersionError) as exc:
            raise self._refuse("pull", target, publisher, str(exc)) from None
        if target.partition("@")[0] not in (manifest.name,) and not _looks_like_cid(target):
            detail = f"asked for {target}, the envelope is for {manifest.name}"
            raise self._refuse("pull", target, publisher, detail, "name_mismatch")
        return manifest

    def _check_staged(
        self,
        staged: Path,
        verified: VerifiedArtifact,
        manifest: Manifest,
        target: str,
        publisher: str,
        written: Mapping[str, str],
    ) -> None:
        sizes = {f.name: f.size for f in manifest.files}
        try:
            verify_files(verified.statement, staged, sizes=sizes, hashed=written)
        except VerificationError as exc:
            raise self._refuse("pull", target, publisher, exc.detail, exc.reason) from None
        try:
            for entry in manifest.files:
                check_file_format(staged / entry.name)
        except FormatError as exc:
            raise self._refuse("pull", target, publisher, str(exc)) from None

    # verify / list ------------------------------------------------------------------------------------------------
    def verify(self, name: str, version: str | None = None, *, trust_publisher: bool = False) -> Installed:
        """Re-verify an installed artifact's signature, trust and files (e.g. after a disk problem)."""
        record = self.registry.find(name, version)
        if record is None:
            raise self._refuse("verify", f"{name}@{version or '*'}", "", f"{name} is not installed")
        folder = Path(record.folder)
        artifact = f"{record.name}@{record.version}"
        envelope = (folder / ENVELOPE_FILE).read_bytes()
        verified = self._verify_envelope(envelope, artifact, trust_publisher)
        manifest = parse_manifest(verified.statement.manifest)
        try:
            verify_files(verified.statement, folder, ignore=(ENVELOPE_FILE,))
        except VerificationError as exc:
            raise self._refuse("verify", artifact, record.publisher, exc.detail, exc.reason) from None
        self.registry.audit("verify", artifact, record.publisher, "ok", "")
        return Installed(folder, manifest, record.root_cid, record.publisher, verified.publisher_trusted)

    # install ------------------------------------------------------------------------------------------------------
    def _staging_root(self) -> Path:
        staging = self.root / ".staging"
        staging.mkdir(mode=0o700, parents=True, exist_ok=True)
        return staging

    def _install(self, staged: Path, manifest: Manifest) -> Path:
        """Rename the verified folder into artifacts/<name>/<version>/ (replacing the same version atomically)."""
        target = self.root / manifest.name / manifest.version
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        for f in staged.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if target.exists():
            old = target.with_name(f".old-{manifest.version}-{os.getpid()}")
            os.rename(target, old)
            os.rename(staged, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staged, target)
        return target

    def _record(self, manifest: Manifest, publisher: str, envelope: bytes, envelope_cid: str, folder: Path) -> None:
        self.registry.add(
            ArtifactRecord(
                manifest.name,
                manifest.version,
                publisher,
                manifest.kind,
                hashlib.sha256(envelope).hexdigest(),
                envelope_cid,
                str(folder),
                time.time(),
            )
        )
        self.registry.saw(manifest.name, publisher, manifest.version)


def _looks_like_cid(text: str) -> bool:
    try:
        Cid.parse(text)
        return True
    except CidError:
        return False


def _artifact_files(path: Path, leave_out: frozenset[str]) -> tuple[dict[str, Path], dict[str, str]]:
    """(name -> path, name -> sha256) of the files to publish: one file, or every file of a folder but those in
    `leave_out` (no symlinks)."""
    if path.is_file():
        return {path.name: path}, {path.name: sha256_file(path)}
    if not path.is_dir():
        raise ValueError(f"{path}: no such file or folder")
    digests = folder_digests(path, ignore=frozenset({ENVELOPE_FILE}) | leave_out)  # refuses symlinks, special files
    if not digests:
        raise ValueError(f"{path}: the folder is empty")
    return {n: path / n for n in digests}, digests


def _per_file(progress: Progress | None, name: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    return lambda done, total: progress(name, done, total)


def describe(installed: Installed) -> dict[str, Any]:
    """JSON-ready summary of an installed artifact (for `model inspect`)."""
    m = installed.manifest
    return {
        "name": m.name,
        "version": m.version,
        "kind": m.kind,
        "publisher": installed.publisher,
        "publisher_trusted": installed.publisher_trusted,
        "envelope_cid": installed.envelope_cid,
        "folder": str(installed.folder),
        "manifest": json.loads(json.dumps(m.to_dict())),
    }


def parse_version(text: str) -> str:
    """Validate a version string for the CLI."""
    SemVer.parse(text)
    return text
