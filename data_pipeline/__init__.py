"""Bytes and tokens: storage URLs, corpus preparation and the resumable TokenStream. Imports no other Kiln package."""
