"""`python -m ssl_jax.data.prepare ...`: the command's name in earlier versions (and in
people's scripts), kept as an alias of `python -m ssl_jax.prepare ...`.

It runs that module as __main__ rather than importing it: the input pipeline
(this package) never imports a dataset builder (DESIGN.md, "Layers").
"""
import runpy

if __name__ == "__main__":
    runpy.run_module("ssl_jax.prepare", run_name="__main__", alter_sys=True)
