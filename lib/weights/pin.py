"""Re-pinning: a repo of the manifest pinned to the commit its revision resolves to on the Hub, with the size and
sha256 the Hub vouches for of every file (`python scripts/weights.py pin`; docs/weights.md)."""

from __future__ import annotations

import hashlib
from dataclasses import replace

from lib.weights.download import Downloader, Tuning, WeightsError, git_blob_sha1
from lib.weights.manifest import Entry, Log, hub_from_env, load_manifest, manifest_path_from_env, write_manifest


def pin(
    repo_ids,
    *,
    manifest_path=None,
    base_url=None,
    token=None,
    revision: str | None = None,
    log: Log = print,
    tuning: Tuning | None = None,
) -> dict:
    """Pin each repo in the manifest to the commit its revision (or `revision`) resolves to on the Hub, with the
    size and sha256 the Hub vouches for of every file the manifest lists: LFS files from their X-Linked-Etag
    (HEAD only), regular files downloaded (they are small) and checked against their git blob SHA-1 ETag.
    Writes the manifest; returns per repo the old revision, the commit and the files whose pins changed."""
    manifest_path = manifest_path_from_env(manifest_path)
    manifest = load_manifest(manifest_path)
    unknown = [r for r in repo_ids if r not in manifest["repos"]]
    if unknown:
        raise WeightsError(f"{manifest_path} has no repo {', '.join(unknown)}; it has {', '.join(manifest['repos'])}")
    base, token = hub_from_env(base_url, token)
    entries = [
        Entry(r, path, revision or manifest["repos"][r]["revision"], None, None, None)
        for r in repo_ids
        for path in manifest["repos"][r]["files"]
    ]
    downloader = Downloader(tuning or Tuning.from_env(), token=token, log=log)
    commits, values = {}, {}
    try:
        for e, p in zip(entries, downloader.probe_all([(e.url(base), e.label) for e in entries]), strict=True):
            if not (p.evidence and p.commit):
                raise WeightsError(
                    f"{e.label}: {base} does not vouch for its files as the Hub does (no X-Repo-Commit "
                    "and ETags); pin needs the Hub. For a mirror, `scripts/weights.py mirror` measures "
                    "the files instead"
                )
            if commits.setdefault(e.repo_id, p.commit) != p.commit:
                raise WeightsError(
                    f"repo {e.repo_id} moved from commit {commits[e.repo_id]} to {p.commit} while "
                    "pinning; run pin again"
                )
            if p.lfs_sha256:
                values[e.repo_id, e.path] = {"sha256": p.lfs_sha256, "size": p.size}
                continue
            data = downloader.fetch_bytes(replace(e, commit=p.commit).url(base), e.label, p.size)
            if git_blob_sha1(data) != p.git_sha1:
                raise WeightsError(f"{e.label}: the bytes received do not match the Hub's ETag {p.git_sha1}; try again")
            values[e.repo_id, e.path] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    finally:
        downloader.close()
    report = {}
    for repo_id in repo_ids:
        spec = manifest["repos"][repo_id]
        files = {path: values[repo_id, path] for path in spec["files"]}
        report[repo_id] = {
            "revision": spec["revision"],
            "commit": commits[repo_id],
            "changed": [path for path in files if files[path] != spec["files"][path]],
        }
        spec.update(revision=commits[repo_id], files=files)
        log(
            f"weights: pinned {repo_id} ({report[repo_id]['revision']}) to commit {commits[repo_id]}; "
            f"{len(report[repo_id]['changed'])} of {len(files)} file pins changed"
        )
    write_manifest(manifest_path, manifest)
    return report
