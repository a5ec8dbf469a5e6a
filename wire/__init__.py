"""The message contract between ``server/`` and ``clients/``: Flower records, keys and the helpers that build them.

It sits on the Flower floor beside the two apps, so both share one definition
of the wire format without either importing the other, and the library below
(``fedistill``) stays free of Flower.
"""
