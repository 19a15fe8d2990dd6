"""From runs to answers: run -> tidy metrics table (`tables`), tables -> figures (`plots`),
and the metrics of one saved network (`saved_model`)."""
