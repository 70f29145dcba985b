"""Nix's byte formats, pure: no file, socket or database access happens here.

Everything in this package takes bytes or strings (or a readable stream for the
streaming NAR reader) and returns bytes, strings or plain data objects.
"""
