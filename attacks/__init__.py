"""Attacks on synthetic sets and the models trained on them, the defences against them, and the audit of a run.

``evasion`` (torchattacks), ``backdoor`` (triggers, poisoned clients,
CTA/ASR), ``membership`` (membership inference) and ``defenses`` (filters on
client sets, and the server's defended aggregation) each work on any model or
set; ``audit`` runs them together on a finished run (``fedistill audit``).
Names are looked up in ``registry.Registry`` instances. Imports only the
library (``fedistill``), so the Flower apps above may use any of it.
"""
