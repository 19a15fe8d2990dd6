"""From runs to answers: run -> tidy metrics table (`tables`), tables -> figures (`plots`),
the metrics of any network at any layer (`model_measure`), sweeps as one table (`sweep`)."""
