"""Ray Data over the runtime: classify, evaluate and calibrate image sets that outgrow one machine.

`python -m cluster.classify BUNDLE --data DIR|CSV|PARQUET --out OUT.parquet`. Ray enters here only: `runtime/` (what
devices install) never imports it, and this package uses only the runtime's public API.
"""
