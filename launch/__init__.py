"""The top floor: the ``fedistill`` command line and the in-process simulation launcher.

It may import every package below it (``fedistill``, ``attacks``, ``clients``,
``server``); nothing imports it, so the library and the Flower apps work
without it.
"""
