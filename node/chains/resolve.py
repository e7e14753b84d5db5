"""A chain installed on this node, ready to run: its YAML read from the verified artifact, each step's adapters
(a personality of this node, or a pulled adapter artifact made for the served base), every artifact re-verified
(signature, trust, files) before it runs."""

import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from crypto.refusal import SingleReason
from marketplace.chain import Chain, ChainError, Step, load_chain
from marketplace.manifest import NAME_RE
from node.adapters.cache import AdapterRef
from node.adapters.check import AdapterRejected, check_adapter_file
from node.state import NodeState

log = logging.getLogger(__name__)


_VERSION = re.compile(r"[0-9A-Za-z.+-]{1,64}")


class ChainRefused(SingleReason):
    """A chain that cannot run here; the detail says which chain, step or artifact, and why."""

    REASON = "chain_refused"


@dataclass(frozen=True)
class RunnableStep:
    """One step as it runs: who answers (a label) and the adapters attached."""

    step: Step
    label: str
    adapters: tuple[AdapterRef, ...]


@dataclass(frozen=True)
class RunnableChain:
    """A verified chain and its steps."""

    chain: Chain
    steps: tuple[RunnableStep, ...]


@functools.cache
def base_digest(path: Path) -> str:
    """sha256 of the served GGUF (what a pulled adapter's manifest names), computed once per daemon."""
    from node.training.base_model import file_digest

    return file_digest(path)


def _market(node: NodeState):  # type: ignore[no-untyped-def]
    from marketplace.artifacts import Marketplace
    from marketplace.content_store import EmbeddedStore
    from marketplace.registry import Registry

    root = node.home.root
    return Marketplace(root / "artifacts", EmbeddedStore(root / "blocks"), Registry(node.home.state_db), node.identity)


def resolve_chain(node: NodeState, target: str) -> RunnableChain:
    """`target` (NAME or NAME@VERSION, the newest installed when no version) verified with what it references;
    ChainRefused naming the chain, the step or the artifact otherwise. Blocking: run it in a thread."""
    from marketplace.artifacts import ArtifactRefused

    name, _, version = target.partition("@")
    if not re.fullmatch(NAME_RE, name) or (version and not _VERSION.fullmatch(version)):
        raise ChainRefused(f"{target[:80]!r} is not a chain name (NAME or NAME@VERSION)")
    market = _market(node)
    try:
        if market.registry.find(name, version or None) is None:  # before verify, which audits every refusal
            raise ChainRefused(f"no chain {target} is installed here (mirador chain pull {target})")
        try:
            installed = market.verify(name, version or None)
        except (ArtifactRefused, OSError) as exc:
            raise ChainRefused(f"chain {target}: {getattr(exc, 'detail', exc)}") from None
        if installed.manifest.kind != "chain":
            raise ChainRefused(f"{target} is a {installed.manifest.kind}, not a chain")
        files = [f.name for f in installed.manifest.files if f.name.endswith((".yaml", ".yml"))]
        if len(files) != 1:
            raise ChainRefused(f"chain {target}: the artifact has {len(files)} YAML files; a chain has one")
        try:
            chain = load_chain(Path(installed.folder) / files[0])
        except ChainError as exc:
            raise ChainRefused(str(exc)) from None
        steps = []
        for i, step in enumerate(chain.steps, start=1):
            if step.personality is not None:
                try:
                    route, refs = node.resolve(step.personality, None)
                except Exception as exc:
                    raise ChainRefused(f"chain {target}: step {i}: personality {step.personality}: {exc}") from None
                steps.append(RunnableStep(step, route.label, refs))
                continue
            assert step.model is not None
            ref_name, ref_version = step.model
            artifact = f"{ref_name}@{ref_version}"
            try:
                ref = market.verify(ref_name, ref_version)
            except (ArtifactRefused, OSError) as exc:
                detail = getattr(exc, "detail", exc)
                raise ChainRefused(f"chain {target}: step {i}: {artifact} does not verify: {detail}") from None
            manifest = ref.manifest
            if manifest.kind != "adapter" or manifest.adapter is None:
                raise ChainRefused(f"chain {target}: step {i}: {artifact} is a {manifest.kind}; steps run adapters")
            if manifest.adapter.base_sha256 != base_digest(node.model.path):
                raise ChainRefused(
                    f"chain {target}: step {i}: {artifact} was trained for {manifest.adapter.base_name}, "
                    "not the model this node serves"
                )
            ggufs = [f.name for f in manifest.files if f.name.endswith(".gguf")]
            if len(ggufs) != 1:
                raise ChainRefused(f"chain {target}: step {i}: {artifact} has {len(ggufs)} GGUF files")
            gguf = Path(ref.folder) / ggufs[0]
            if node.adapters.dims is None:
                raise ChainRefused(f"chain {target}: step {i}: the served model takes no adapters")
            try:
                check_adapter_file(gguf, node.adapters.dims)
            except AdapterRejected as exc:
                raise ChainRefused(f"chain {target}: step {i}: {artifact}: {exc}") from None
            steps.append(RunnableStep(step, artifact, (AdapterRef(artifact, gguf),)))
        return RunnableChain(chain, tuple(steps))
    finally:
        market.registry.close()
