"""The run folder and its one owner: every file name once (`layout`), atomic writes and
checksums (`files`), history, checkpoint and config files (`store`), the manifest's schema
(`manifest`), new / resume / refuse (`resume`), snapshots of features and classifier
(`snapshots`) and the sweep folder (`sweeps`)."""
