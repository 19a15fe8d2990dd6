"""The configs shipped with nctools: `nctools train demo`, `nctools train papyan2020/NAME`."""
