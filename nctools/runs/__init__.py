"""The run directory: every file name once, atomic writes, checksums, manifest, history,
checkpoint (`store`) and snapshots of features and classifier (`snapshots`)."""
