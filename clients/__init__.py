"""The Flower ClientApp: a train message in, the node's synthetic set (or locally trained weights) out.

``app`` translates messages to library calls and back, ``fit`` is the
FedAvg/FedProx local training, ``private`` the private variants with their
budget check. Everything it calls runs without Flower (``fedistill``); a
malicious node's poisoning comes from ``attacks.backdoor``.
"""
