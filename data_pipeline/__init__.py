"""Bytes and tokens: storage URLs (retries, atomic and exclusive writes), corpus preparation (`kiln prepare`,
the one user of Ray Data), prepared datasets and the resumable TokenStream. Imports no other Kiln package.
"""
