"""The paper's 21 cells (Papyan, Han & Donoho, PNAS 2020, Table 1)."""
