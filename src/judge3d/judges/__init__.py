"""Judges: the swap protocol (protocol.py, verdict_log.py), the ``hf`` VLM backend (hf.py), the tiny
mini-world judges (tiny.py, train.py) and their pair data (pairs.py).

Kept import-light on purpose: ``from judge3d.judges.hf import HFJudge`` pulls in transformers only
where a model is actually used (verify and the report never need it).
"""
