"""Neural-collapse metrics: pure formulas on class statistics (`functional`), the one
sum-reducible accumulator (`stats`), NC4's decision rules (`decisions`) and the measuring
entry points (`measure`). Knows nothing of models, runs or files."""
