"""The Mirador manifest: what an artifact (model, adapter or chain) is, its files and how they are addressed.

The manifest is the predicate of the signed in-toto statement (crypto.statement adds the publisher's key to it);
the statement's subjects repeat each file's sha256, so a manifest whose files disagree with the subjects is
refused (`check_against_subjects`). Strict: unknown fields, wrong types, unsafe file names and inconsistent
kinds are errors naming the field.
"""

import re
from typing import Annotated, Any, Literal

import msgspec

from crypto.refusal import SingleReason
from marketplace.semver import SemVer, VersionError

SCHEMA = "mirador.manifest/v1"
NAME_RE = r"^[a-z0-9][a-z0-9._-]{0,63}$"
Name = Annotated[str, msgspec.Meta(pattern=NAME_RE)]
Sha256 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
Text = Annotated[str, msgspec.Meta(max_length=4096)]
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
ENVELOPE_FILE = "envelope.json"  # the signed envelope, kept next to an installed artifact's files: never a file of it
SAFE_SUFFIXES = frozenset({".gguf", ".safetensors", ".json", ".yaml", ".yml", ".toml", ".txt", ".md"})
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*$")


class ManifestError(SingleReason):
    """The manifest is refused; the message names the field."""

    REASON = "bad_manifest"


class FileEntry(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One file of the artifact: where it sits in the folder, its size, digest, CID and chunking profile."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
    size: Annotated[int, msgspec.Meta(ge=0)]
    sha256: Sha256
    cid: Annotated[str, msgspec.Meta(min_length=2, max_length=128)]
    chunking: Annotated[str, msgspec.Meta(max_length=64)]


class LoraInfo(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The LoRA configuration of an adapter."""

    rank: Annotated[int, msgspec.Meta(ge=1, le=1024)]
    alpha: Annotated[float, msgspec.Meta(gt=0)]
    targets: Annotated[list[Annotated[str, msgspec.Meta(pattern=r"^[a-z_]{1,32}$")]], msgspec.Meta(min_length=1)]


class AdapterInfo(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """What an adapter was trained for: the base model's file digest and name, and its LoRA config."""

    base_sha256: Sha256
    base_name: Text
    lora: LoraInfo


class ArtifactRef(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """An artifact a chain uses: name@version, and the CID and sha256 of its signed envelope."""

    name: Name
    version: Annotated[str, msgspec.Meta(max_length=64)]
    envelope_cid: Annotated[str, msgspec.Meta(min_length=2, max_length=128)]
    envelope_sha256: Sha256


class Manifest(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A Mirador manifest (the signed predicate, without the publisher field crypto.statement adds)."""

    schema: Literal["mirador.manifest/v1"]
    kind: Literal["model", "adapter", "chain"]
    name: Name
    version: Annotated[str, msgspec.Meta(max_length=64)]
    files: Annotated[list[FileEntry], msgspec.Meta(min_length=1, max_length=256)]
    license: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    description: Text = ""
    created: Annotated[str, msgspec.Meta(max_length=40)] = ""
    adapter: AdapterInfo | None = None
    references: list[ArtifactRef] | None = None
    benchmarks: dict[Annotated[str, msgspec.Meta(max_length=64)], float] = {}

    @property
    def semver(self) -> SemVer:
        """The parsed version."""
        return SemVer.parse(self.version)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (None fields left out), as it goes into the statement."""
        return {k: v for k, v in msgspec.to_builtins(self).items() if v is not None}


def check_file_name(name: str) -> None:
    """Refuse names that are not plain relative paths inside the artifact folder, or that are pickles."""
    if not _FILE_NAME.match(name) or ".." in name.split("/"):
        raise ManifestError(f"files: {name!r} is not a plain relative path inside the artifact folder")
    if name == ENVELOPE_FILE:
        raise ManifestError(f"files: {name!r} is a reserved name (the installed artifact's signed envelope)")
    suffix = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if suffix in PICKLE_SUFFIXES:
        raise ManifestError(f"files: {name!r} is a pickle format; only GGUF, safetensors and text are allowed")
    if suffix not in SAFE_SUFFIXES:
        raise ManifestError(f"files: {name!r} has an unsupported type (allowed: {', '.join(sorted(SAFE_SUFFIXES))})")


def parse_manifest(data: dict[str, Any]) -> Manifest:
    """Validate a manifest (the statement's predicate without `publisher`); ManifestError names the field."""
    try:
        manifest = msgspec.convert(data, Manifest)
    except msgspec.ValidationError as exc:
        raise ManifestError(f"manifest: {str(exc).replace('$.', '')}") from None
    try:
        SemVer.parse(manifest.version)
    except VersionError as exc:
        raise ManifestError(f"manifest: version: {exc}") from None
    names = [f.name for f in manifest.files]
    if len(set(names)) != len(names):
        raise ManifestError("manifest: files: names must be unique")
    for name in names:
        check_file_name(name)
    if (manifest.kind == "adapter") != (manifest.adapter is not None):
        raise ManifestError("manifest: 'adapter' (base digest and LoRA config) is required for adapters, and only them")
    if (manifest.kind == "chain") != (manifest.references is not None):
        raise ManifestError("manifest: 'references' (name@version + digest) is required for chains, and only them")
    return manifest


def check_against_subjects(manifest: Manifest, subjects: dict[str, str]) -> None:
    """The signed subjects (name -> sha256) must be exactly the manifest's files with the same digests."""
    files = {f.name: f.sha256 for f in manifest.files}
    if files != subjects:
        missing = sorted(set(files) - set(subjects))
        extra = sorted(set(subjects) - set(files))
        differ = sorted(n for n in set(files) & set(subjects) if files[n] != subjects[n])
        raise ManifestError(
            f"manifest files and signed subjects disagree (missing {missing}, extra {extra}, digests differ {differ})"
        )
