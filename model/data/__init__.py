"""Data: manifests (rows, splits, dedup), dataset sources (folder layouts -> rows,
pixels back), per-image face features, the aligned-face cache `ipdfer prepare`
writes, and the datasets training and evaluation read from it."""
