"""Merging adapters into a base checkpoint: api.py (the public ``merge``), plan.py (everything decided from
headers), engine.py (the one streaming loop and its threads), devices.py (where it computes), files.py (I/O),
pipeline.py (diffusers pipeline directories), split.py and shares.py (a merge split by output shard).
"""
