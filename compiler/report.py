"""`chmc inspect`: an artifact's manifest as rich tables, after checking the artifact against it.

The reconstruction errors were measured at build time and stored in the manifest, so inspecting
never reopens the experts; it reads the manifest, the shard headers and the index tables.
"""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from chmc.formats.artifact import Artifact, ArtifactManifest


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def summary_table(manifest: ArtifactManifest, path: Path) -> Table:
    acc = manifest.accounting
    table = Table(title=f"chmc artifact {path}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("architecture", manifest.architecture)
    table.add_row("experts", str(len(manifest.experts)))
    table.add_row("groups (K)", str(manifest.groups))
    if manifest.budget:
        table.add_row("budget", f"{manifest.budget.fraction} of the ensemble (K per tensor)")
    if manifest.calibration:
        table.add_row("calibration", ", ".join(f"{k}={v}" for k, v in manifest.calibration.items()))
    table.add_row("clustering", manifest.clustering)
    table.add_row("method", manifest.method)
    table.add_row("parameters", ", ".join(f"{k}={v}" for k, v in manifest.parameters.items()))
    table.add_row("dtype", str(manifest.dtype))
    table.add_row("tied embeddings", str(manifest.tie_word_embeddings))
    table.add_row("base params", _count(acc.base))
    table.add_row("ensemble params", _count(acc.ensemble))
    table.add_row("artifact params", _count(acc.artifact))
    table.add_row("ratio to ensemble", f"{acc.ratio:.3f}")
    return table


def experts_table(manifest: ArtifactManifest) -> Table:
    table = Table(title="experts: ||W_rec - W_expert|| / ||W_expert - W_base|| (merged tensors)")
    table.add_column("id", justify="right")
    table.add_column("name")
    table.add_column("from")
    table.add_column("relative error", justify="right")
    table.add_column("sha256")
    for i, e in enumerate(manifest.experts):
        table.add_row(str(i), e.name, e.kind, f"{e.rel_error:.4f}", e.sha256[:12])
    return table


def tensors_table(manifest: ArtifactManifest) -> Table:
    names = manifest.expert_names
    table = Table(title="tensors")
    table.add_column("tensor")
    table.add_column("kind")
    table.add_column("shape")
    table.add_column("K", justify="right")
    table.add_column("groups used", justify="right")
    for n in names:
        table.add_column(f"err {n}", justify="right")
    for name, e in manifest.tensors.items():
        stats = e.stats
        errs = [f"{stats.rel_error[n]:.3f}" if stats else "exact" for n in names]
        used = f"{stats.mean_groups_used:.2f}" if stats else "-"
        table.add_row(name, e.kind, "x".join(map(str, e.shape)),
                      str(e.groups if e.groups is not None else "-"), used, *errs)
    return table


def inspect_artifact(path: str | Path, tensors: bool = False) -> list[Table]:
    """The tables `chmc inspect` prints: summary, experts, and optionally every tensor; the
    artifact is verified first (headers against file sizes, shapes, index values)."""
    artifact = Artifact(path)
    artifact.verify()
    manifest = artifact.manifest
    tables = [summary_table(manifest, Path(path)), experts_table(manifest)]
    if tensors:
        tables.append(tensors_table(manifest))
    return tables
