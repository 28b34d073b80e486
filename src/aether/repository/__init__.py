"""The cluster's artifact repository: slice and library wheels stored in the cluster (docs/repository.md).

Owns where wheels live once they are uploaded to any node, how a node finds and fetches the wheels
it needs, and the two read protocols every node serves over it (a PEP 503 / PEP 691 "simple"
index for pip, a Maven-style path subset):

- `core`     (sans-IO) the decisions: checking an upload (size, hash, name and version against the
             wheel's metadata), the manifest it becomes, whether it is new, the same or a
             conflicting version, chunk keys, Maven paths, the simple index's documents.
- `errors`   the repository's errors, each with its HTTP status.
- `service`  `ArtifactService`, the asyncio adapter: wheel bytes in chunks of the upload's own in
             the distributed map `aether.repository` (defined on first use), a slice's claim on its
             coordinates and then the manifest, each with compare-and-set, in the consensus store
             (`repository-coords/{coords}`, `repository/{project}/{version}`); a delete leaves a
             tombstone (`repository-deleted/{project}/{version}`); the leader collects the
             chunks no manifest refers to (interrupted uploads).
- `cache`    `ClusterRepository`, the `slices.Repository` the node's loader and deployment code
             use: manifests from the cluster, wheels fetched into the local directory, which is
             only a cache (sha256-checked) and the bootstrap of a single machine; a file
             kept there under a deleted version is not loaded.

May import: `aether.core`, `aether.kv.keys`, `aether.slices` (repository, wheel, errors), `packaging`.
It reaches the map service and the store through the Protocols in `service` (the node fills them in).
"""
