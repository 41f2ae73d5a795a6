"""Federated data: `federated.load(config.data, seed) -> FederatedData` (docs/datasets.md §8).

Public API: `adpfl_jax.data.federated.load` and `FederatedData` (defined in `padded`), plus
`federated.DATASETS`, `sources.TASKS` and `partition.PARTITIONS`, the valid `config.data.name` /
`partition` values.

Data flow, with each module's job (arrows point from importer to imported; no cycle):

  federated   the pipeline: read → subsample → partition → split → one example per privacy
   │          unit → decode the kept cases → pad
   ├─ sources       a folder as records + `read` of the kept ones: raw release or prepared set
   │   ├─ ham10000, kits23, brats (→ nifti)   readers: scan a release, decode one case
   │   ├─ preprocess3d                        3D resampling, normalisation, crop/pad
   │   └─ tfds_ham10000, tfds_3d              `adpfl data prepare` builders; find / index
   ├─ partition     natural / iid / dirichlet, grouped splits, subsampling, one per group
   ├─ phantoms      phantom releases and their cache (→ phantoms_ham10000, phantoms3d)
   ├─ phantom_skin  the built-in in-memory federation
   └─ padded        `FederatedData` and padding (the leaf)
"""
